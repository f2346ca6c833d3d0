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


SELF_IDENTIFYING = {
    # gitleaks rule file -> the format the docs list as found bare (sectune.data.token_formats
    # names, or a detect-secrets plugin). Every sample of these files counts, public keys
    # among them (Flutterwave FLWPUBK, Mailgun pubkey-, Mapbox pk., Lob test_pub_): kept on
    # purpose, they are counted as misses.
    **{
        name: name
        for name in (
            "1password",
            "age",
            "anthropic",
            "atlassian",
            "aws",
            "clojars",
            "databricks",
            "definednetworking",
            "digitalocean",
            "doppler",
            "duffel",
            "dynatrace",
            "easypost",
            "flutterwave",
            "frameio",
            "gcp",
            "github",
            "gitlab",
            "gitter",
            "grafana",
            "harness",
            "huggingface",
            "infracost",
            "linear",
            "mailchimp",
            "mailgun",
            "newrelic",
            "npm",
            "octopusdeploy",
            "openai",
            "openshift",
            "perplexity",
            "planetscale",
            "postman",
            "prefect",
            "pulumi",
            "pypi",
            "readme",
            "rubygems",
            "scalingo",
            "sendgrid",
            "sendinblue",
            "settlemint",
            "shippo",
            "shopify",
            "slack",
            "square",
            "stripe",
            "twilio",
            "typeform",
            "yandex",
        )
    },
    "hashicorp_vault": "hashicorp-vault",
    "flyio": "flyio",
}
TEMPLATES = (  # three log shapes, none of them naming the secret as one
    "2026-12-03T10:14:07Z proxy: upstream rejected credential {} from 10.20.0.7",
    'Dec  3 10:14:07 build-7 runner[2211]: step 4 ran "deploy --target prod {}" exit=0',
    "alert: outbound POST to api.example.net carried {} in its body (rule 4471)",
)


def _clean_texts() -> list[str]:
    """Security text with no secrets in it: ATT&CK procedures, Sigma rules, parsed log lines."""
    root = Path(__file__).resolve().parents[1] / "examples"
    texts = []
    for path in sorted(root.glob("*/data/*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts.append(str(row.get("text") or row.get("input") or row.get("instruction") or ""))
    return [t for t in texts if t]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default="v8.30.1", help="gitleaks module version")
    parser.add_argument("--show", type=int, default=10, help="missed samples to print")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="secret seeds")
    args = parser.parse_args()

    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    rules = gitleaks_rules(args.version)
    sanitizer = Sanitizer(SanitizeSpec())

    def caught(line: str, secret: str) -> bool:
        return secret not in sanitizer.redact({"t": line})["t"]

    keyed: Counter[str] = Counter()
    bare: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    missed: list[tuple[str, str]] = []
    skipped = 0
    for seed in args.seeds:
        planted, skipped = samples(rules, seed)
        for rule, provider, secret in planted:
            seen[rule] += len(TEMPLATES)
            keyed[rule] += len(TEMPLATES) * caught(f'{provider}_api_token = "{secret}"', secret)
            for template in TEMPLATES:
                line = template.format(secret)
                if caught(line, secret):
                    bare[rule] += 1
                elif rule in SELF_IDENTIFYING:
                    missed.append((rule, secret))
    total = sum(seen.values())
    print(
        f"gitleaks {args.version}: {total // len(TEMPLATES)} samples from {len(seen)} rule "
        f"files over seeds {args.seeds} ({skipped} per seed built in ways this script does not "
        "follow, left out); each rendered keyed and bare in 3 log lines"
    )
    print(f'keyed (`<provider>_api_token = "…"`): recall {sum(keyed.values()) / total:.3f}')
    listed = [r for r in seen if r in SELF_IDENTIFYING]
    other = [r for r in seen if r not in SELF_IDENTIFYING]
    for name, group in (("self-identifying formats the docs list", listed), ("all others", other)):
        n, k = sum(seen[r] for r in group), sum(bare[r] for r in group)
        print(f"bare, {name}: recall {k / n:.3f} ({k}/{n}) over {len(group)} rule files")
    print("\n| gitleaks rule file | bare recall |\n|---|---|")
    for rule in sorted(listed):
        print(f"| {rule} | {bare[rule] / seen[rule]:.3f} ({bare[rule]}/{seen[rule]}) |")
    for rule, secret in missed[: args.show]:
        print(f"  missed ({rule}): {secret[:90]}")

    clean = _clean_texts()
    changed = []
    for text in clean:
        redacted = sanitizer.redact({"t": text})["t"]
        if "<SECRET_" in redacted and "<SECRET_" not in text:
            changed.append(text)
    print(
        f"\nclean security text (examples/*/data: ATT&CK procedures, Sigma rules, log lines): "
        f"{len(changed)} of {len(clean)} texts got a <SECRET_n> placeholder"
    )
    for text in changed[: args.show]:
        print(f"  {text[:150]!r}")


if __name__ == "__main__":
    main()
