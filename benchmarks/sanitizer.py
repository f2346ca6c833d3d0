"""Sanitizer recall and false positives on the labelled corpus (tests/data/sanitize-corpus.jsonl)
and how many rows of the example datasets it changes (they hold no personal data or secrets, so
every change there is a false positive or a public value such as a vendor e-mail).

    python benchmarks/sanitizer.py [--data examples/attack-tactics/data/validation.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.sanitize_corpus import INTERNAL_DOMAINS, load, score  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="*", default=[])
    args = parser.parse_args()

    began = time.perf_counter()
    result = score(load())
    seconds = time.perf_counter() - began
    print(f"corpus: {sum(result['planted'].values())} planted values, {seconds:.1f} s")
    print(f"{'type':28s} {'planted':>7s} {'recall':>7s}")
    for kind, recall in result["recall"].items():
        print(f"{kind:28s} {result['planted'][kind]:7d} {recall:7.3f}")
    print(f"clean lines changed: {len(result['cleanChanged'])}/{result['cleanLines']}")

    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    for path in args.data:
        sanitizer = Sanitizer(SanitizeSpec(internal_domains=INTERNAL_DOMAINS))
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line]
        changed = sum(1 for r in rows if sanitizer.redact({"t": r["text"]})["t"] != r["text"])
        kinds = Counter(sanitizer.report.counts)
        print(f"{path}: {changed}/{len(rows)} rows changed; {dict(kinds.most_common())}")


if __name__ == "__main__":
    main()
