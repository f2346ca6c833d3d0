"""Sanitizer recall on personal data nobody here wrote: the sentence templates Microsoft's
Presidio project ships for evaluating PII detectors (`templates.txt` in the PyPI wheel
`presidio-evaluator`, fetched with `pip download`), filled with values from Faker's providers in
several locales. Neither the templates nor the values were seen when the sanitizer's rules were
written; the in-sample corpus (benchmarks/sanitizer.py) was.

A value counts as found when no piece of it is left in the redacted sentence: neither the value
itself nor any of its letter-or-digit runs of 4 or more characters (a card number redacted but
for its last group, or a name whose surname stays, is a miss). Placeholders of types the
sanitizer does not claim (addresses, cities, organisations, ages, ...) are filled too, and only
counted to show what is left in the text.

    python benchmarks/sanitizer_pii_outside.py [--seeds 0 1 2] [--locales en_US en_GB de_DE]
    # locales not looked at while the rules were changed
    python benchmarks/sanitizer_pii_outside.py --locales fr_FR es_ES it_IT en_IN --skip-clean
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter, defaultdict
from operator import methodcaller
from pathlib import Path
from typing import Any

WHEEL = "presidio-evaluator==0.3.2"
TEMPLATES = "presidio_evaluator/data_generator/raw_data/templates.txt"
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PIECE = re.compile(r"[^\W_]{4,}")
TITLES = {"prof", "univ", "dipl", "herr", "frau", "miss"}
STEMS = ("CARD", "PHONE", "PERSON", "SSN", "EMAIL", "IBAN", "IP")

# Template placeholder -> (the type the sanitizer claims, how Faker makes a value). Most
# placeholders are named after the Faker provider that fills them.
_PROVIDED = {
    "CARD": ["credit_card_number"],
    "PHONE": ["phone_number"],
    "IBAN": ["iban"],
    "EMAIL": ["email"],
    "US_SSN": ["ssn"],
    "PERSON": [
        "name", "name_female", "name_male", "first_name", "first_name_male",
        "first_name_female", "first_name_nonbinary", "last_name", "last_name_male",
        "last_name_female",
    ],
}  # fmt: skip
CLAIMED: dict[str, tuple[str, Any]] = {
    **{p: (kind, methodcaller(p)) for kind, providers in _PROVIDED.items() for p in providers},
    "ip_address": ("IP", lambda f: f.ipv4() if f.random.random() < 0.7 else f.ipv6()),
    "person": ("PERSON", methodcaller("name")),
}
# Context the sanitizer does not claim to find, filled so the sentences read as they should.
CONTEXT: dict[str, Any] = {
    "organization": lambda f: f.company(),
    "nationality": lambda f: "French",
    "nation_woman": lambda f: "Frenchwoman",
    "nation_plural": lambda f: "Canadians",
    "us_driver_license": lambda f: f.bothify("?#######").upper(),
    "age": lambda f: str(f.random_int(18, 90)),
    "url": lambda f: f.url(),
    "date_time": lambda f: f.date_time().strftime("%B %d, %Y %H:%M"),
    "date_of_birth": lambda f: f.date_of_birth().strftime("%m/%d/%Y"),
}


def templates(cache: Path) -> list[str]:
    """The template lines of Presidio's evaluator wheel, downloaded once into `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("presidio_evaluator-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
            check=True,
        )
        wheels = sorted(cache.glob("presidio_evaluator-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        text = wheel.read(TEMPLATES).decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def fill(template: str, faker: Any) -> tuple[str, list[tuple[str, str]]]:
    """The template with every placeholder filled, and the claimed (type, value) pairs in it."""
    planted: list[tuple[str, str]] = []

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in CLAIMED:
            kind, make = CLAIMED[name]
            made = str(make(faker))
            planted.append((kind, made))
            return made
        if name in CONTEXT:
            return str(CONTEXT[name](faker))
        maker = getattr(faker, name, None) or faker.city  # a provider this locale lacks
        return str(maker())  # address, city, country, job, ... from Faker

    return PLACEHOLDER.sub(value, template), planted


def found(value: str, redacted: str) -> bool:
    """No piece of `value` is left: not whole, and no letter-or-digit run of 4+ of it (titles
    such as "Prof." or "Frau" in Faker's names are not personal data, and may stay)."""
    lowered = redacted.lower()
    if value.lower() in lowered:
        return False
    return not any(
        re.search(rf"(?<![^\W_]){re.escape(p.lower())}(?![^\W_])", lowered)
        for p in PIECE.findall(value)
        if p.lower() not in TITLES
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--locales", nargs="+", default=["en_US", "en_GB", "de_DE"])
    parser.add_argument("--show", type=int, default=12, help="misses to print")
    parser.add_argument("--skip-clean", action="store_true", help="recall only")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "sectune-presidio-evaluator"
    )
    args = parser.parse_args()

    from faker import Faker

    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    lines = templates(args.cache)
    sanitizer = Sanitizer(SanitizeSpec())
    planted: Counter[tuple[str, str]] = Counter()
    caught: Counter[tuple[str, str]] = Counter()
    misses: dict[str, list[str]] = defaultdict(list)
    for locale in args.locales:
        for seed in args.seeds:
            faker = Faker(locale)
            faker.seed_instance(seed)
            for template in lines:
                sentence, values = fill(template, faker)
                if not values:
                    continue
                redacted = sanitizer.redact({"t": sentence})["t"]
                for kind, value in values:
                    planted[(kind, locale)] += 1
                    if found(value, redacted):
                        caught[(kind, locale)] += 1
                    else:
                        misses[kind].append(f"[{locale}] {value!r} in: {redacted}")
    kinds = sorted({k for k, _ in planted})
    print(f"{len(lines)} templates x {len(args.seeds)} seeds x locales {', '.join(args.locales)}")
    print(f"| type | {' | '.join(args.locales)} | all |")
    print(f"| --- |{' ---: |' * (len(args.locales) + 1)}")
    for kind in kinds:
        cells = []
        for locale in args.locales:
            n = planted[(kind, locale)]
            cells.append(
                f"{caught[(kind, locale)] / n:.3f} ({caught[(kind, locale)]}/{n})" if n else "-"
            )
        total = sum(planted[(kind, loc)] for loc in args.locales)
        hit = sum(caught[(kind, loc)] for loc in args.locales)
        print(f"| {kind} | {' | '.join(cells)} | {hit / total:.3f} ({hit}/{total}) |")
    for kind in kinds:
        for line in misses[kind][: args.show]:
            print(f"missed {kind}: {line}")

    if args.skip_clean:
        return
    # The other side: security text with no personal data in it, and what it loses.
    from sanitizer_outside import _clean_texts

    clean = _clean_texts()
    given: Counter[str] = Counter()
    shown: list[str] = []
    for text in clean:
        redacted = sanitizer.redact({"t": text})["t"]
        stems = {s for s in STEMS if f"<{s}_" in redacted and f"<{s}_" not in text}
        given.update(stems)
        if stems and len(shown) < args.show:
            shown.append(f"{sorted(stems)} {redacted[:150]!r}")
    print(f"\nclean security texts (examples/*/data), {len(clean)}: given a placeholder of")
    for stem in STEMS:
        print(f"  {stem}: {given[stem]}")
    for line in shown:
        print(f"  {line}")


if __name__ == "__main__":
    main()
