"""Sanitizer recall on secrets nobody here wrote: the true-positive samples gitleaks ships for
its rules (its Go module, fetched through the Go module proxy), rendered as gitleaks renders a
sample (`<provider>_api_token = "<secret>"`: the `token` key alone gets it redacted) and, the
harder case, bare in a log line with no key naming it (`... upstream rejected credential
<secret> from 10.20.0.7`), where only the detectors for that kind of secret can find it. A sample's secret is a string literal, or built
as gitleaks builds it at run time: literals joined with `secrets.NewSecret(...)` of its
character-class helpers (`utils.AlphaNumeric("32")`, `utils.Hex("40")`, …) or of a regex made
of literal characters and `[class]{n}` runs; samples built any other way are left out and
counted. A secret counts as found when it no longer appears in the redacted line.

    python benchmarks/sanitizer_outside.py [--version v8.30.1] [--show 10]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from collections import Counter
from pathlib import Path

SAMPLE_CALL = re.compile(r'GenerateSampleSecrets?\(\s*"([^"\\]*)"\s*,')
HELPERS = {  # gitleaks' cmd/generate/config/utils/patterns.go, by name: the class each draws from
    "Numeric": "0-9",
    "Hex": "a-f0-9",
    "AlphaNumeric": "a-z0-9",
    "AlphaNumericExtendedShort": "a-z0-9_-",
    "AlphaNumericExtended": "a-z0-9=_-",
    "AlphaNumericExtendedLong": "a-z0-9/=_+-",
}
RUN = re.compile(r"\[([^\]]+)\]\{(\d+)(?:,(\d+))?\}|\\(.)|([^\[\\(){}|*+?^$.])")


def _argument(text: str, start: int) -> tuple[str, int]:
    """The expression from `start` up to the comma or parenthesis that closes the call."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote:
                quote = ""
        elif char in '"`':
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return text[start:i], i
            depth -= 1
        i += 1
    return text[start:], i


def _split(expression: str) -> list[str]:
    """Top-level `+` terms of a Go string expression."""
    terms, depth, quote, current = [], 0, "", ""
    for char in expression:
        if quote:
            quote = "" if char == quote else quote
        elif char in '"`':
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "+" and depth == 0:
            terms.append(current.strip())
            current = ""
            continue
        current += char
    return [*terms, current.strip()]


def _chars(spec: str) -> str:
    out, i = "", 0
    while i < len(spec):
        if i + 2 < len(spec) and spec[i + 1] == "-":
            out += "".join(chr(c) for c in range(ord(spec[i]), ord(spec[i + 2]) + 1))
            i += 3
        else:
            out += spec[i].replace("\\", "")
            i += 1
    return out


def _from_regex(pattern: str, rng: random.Random) -> str | None:
    """A string matching `pattern`, for regexes of literal characters and [class]{n} runs."""
    out, pos = "", 0
    for match in RUN.finditer(pattern):
        if match.start() != pos:
            return None
        pos = match.end()
        if match.group(1):
            low = int(match.group(2))
            size = rng.randint(low, int(match.group(3) or low))
            chars = _chars(match.group(1))
            out += "".join(rng.choice(chars) for _ in range(size))
        else:
            out += match.group(4) or match.group(5)
    return out if pos == len(pattern) else None


def _value(term: str, rng: random.Random) -> str | None:
    if term.startswith('"') and term.endswith('"'):
        return bytes(term[1:-1], "utf-8").decode("unicode_escape")
    if term.startswith("`") and term.endswith("`"):
        return term[1:-1]
    helper = re.fullmatch(r'secrets\.NewSecret\(utils\.(\w+)\("(\d+)"\)\)', term)
    if helper and helper.group(1) in HELPERS:
        size = int(helper.group(2))
        return "".join(rng.choice(_chars(HELPERS[helper.group(1)])) for _ in range(size))
    raw = re.fullmatch(r'secrets\.NewSecret\((`[^`]*`|"[^"]*")\)', term)
    if raw:
        return _from_regex(raw.group(1)[1:-1], rng)
    return None


def gitleaks_rules(version: str) -> Path:
    """gitleaks' rule sources, from the Go module cache (downloaded once)."""
    fetched = subprocess.run(
        ["go", "mod", "download", "-json", f"github.com/zricethezav/gitleaks/v8@{version}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(fetched.stdout)["Dir"]) / "cmd" / "generate" / "config" / "rules"


def samples(rules: Path, seed: int = 0) -> tuple[list[tuple[str, str, str]], int]:
    """(rule file, provider, secret) for every sample that can be built, and how many could
    not be."""
    rng = random.Random(seed)
    found, skipped = [], 0
    for path in sorted(rules.glob("*.go")):
        if path.name.endswith("_test.go"):
            continue
        text = path.read_text()
        for match in SAMPLE_CALL.finditer(text):
            expression, _ = _argument(text, match.end())
            parts = [_value(term, rng) for term in _split(expression.strip())]
            if any(p is None for p in parts):
                skipped += 1
                continue
            secret = "".join(p for p in parts if p is not None)
            if len(secret) >= 8:
                found.append((path.stem, match.group(1), secret))
    return found, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default="v8.30.1", help="gitleaks module version")
    parser.add_argument("--show", type=int, default=10, help="missed samples to print")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated secrets")
    args = parser.parse_args()

    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    planted, skipped = samples(gitleaks_rules(args.version), args.seed)
    print(
        f"gitleaks {args.version}: {len(planted)} samples from "
        f"{len({rule for rule, _, _ in planted})} rule files ({skipped} built in ways this "
        "script does not follow, left out)"
    )
    renderings = {
        "as gitleaks renders it": lambda provider, secret: f'{provider}_api_token = "{secret}"',
        "bare in a log line": lambda provider, secret: (
            f"2026-12-03T10:14:07Z proxy: upstream rejected credential {secret} from 10.20.0.7"
        ),
    }
    for name, render in renderings.items():
        sanitizer = Sanitizer(SanitizeSpec())
        per_file: Counter[str] = Counter()
        caught: Counter[str] = Counter()
        missed = []
        for rule, provider, secret in planted:
            line = render(provider, secret)
            per_file[rule] += 1
            if secret not in sanitizer.redact({"t": line})["t"]:
                caught[rule] += 1
            else:
                missed.append((rule, line))
        total, found = sum(per_file.values()), sum(caught.values())
        whole = sum(1 for r in per_file if caught[r] == per_file[r])
        print(
            f"{name}: recall {found / total:.3f} ({found}/{total}); rule files fully caught: "
            f"{whole}/{len(per_file)}"
        )
        for rule, line in missed[: args.show]:
            print(f"  missed ({rule}): {line[:110]}")


if __name__ == "__main__":
    main()
