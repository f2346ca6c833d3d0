"""Redact secrets and personal data before anything else reads the examples.

Secrets are found by every detect-secrets plugin (its token regexes, keywords and the
base64 entropy check on quoted strings) plus patterns for what those miss in security data:
passwords on command lines (`curl -u`, `sshpass -p`, `net user … /add`), in URLs and in
`Authorization:` headers, `*_secret_*=` assignments, GitHub/GitLab tokens and JWTs. A
detect-secrets hit is widened to the whole token it sits in (plugins report a capture group,
e.g. only the `glpat` of a GitLab token). Hex entropy is not checked: file hashes are indicators
the model must see, not secrets.

Personal and infrastructure data: Presidio's pattern recognizers (e-mail, IP, phone, card,
IBAN, URL, US SSN) on an offline, blank spaCy pipeline; person names from the first- and
last-name lists that Faker ships (see `names.py`); and recognizers for what security logs carry
(usernames in user=/User: fields and Windows profile paths, hostnames under internal domains,
AWS account ids, Windows SIDs, MAC addresses).

Each distinct value becomes a typed placeholder numbered per example (`<IP_1>`, `<USER_1>`), so
"the same user failed, then succeeded" survives; a value found anywhere in an example (any
field, any chat message) is replaced everywhere in it, whatever its letter case.

Nothing here touches the network: tldextract is pinned to its bundled suffix list and spaCy's
pipeline is blank, so no model download is attempted.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sectune.config import SanitizeSpec
from sectune.data.names import person_spans
from sectune.data.token_formats import TOKEN_PATTERN

# Presidio entity -> placeholder stem.
PLACEHOLDERS = {
    "SECRET": "SECRET",
    "URL_CREDENTIALS": "SECRET",
    "EMAIL_ADDRESS": "EMAIL",
    "IP_ADDRESS": "IP",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "MAC_ADDRESS": "MAC",
    "USERNAME": "USER",
    "HOSTNAME": "HOST",
    "AWS_ACCOUNT_ID": "AWS_ACCOUNT",
    "WINDOWS_SID": "SID",
    "URL": "URL",
    "US_SSN": "SSN",
    "PERSON": "PERSON",
}

_SECRET_KEYWORD = (
    r"(?:password|passwd|passphrase|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|client[_-]?secret|credentials?)"
)

# Words that follow "account"/"user" in prose without being a login name.
# fmt: off
_PROSE_AFTER_ACCOUNT = (
    "account", "accounts", "name", "names", "is", "was", "were", "has", "had", "have", "logged",
    "login", "logon", "logins", "logs", "with", "and", "or", "not", "the", "a", "an", "from",
    "to", "for", "of", "in", "on", "at", "by", "that", "which", "who", "activity", "access",
    "rights", "right", "group", "groups", "session", "sessions", "password", "passwords",
    "credential", "credentials", "profile", "profiles", "data", "list", "created", "deleted",
    "disabled", "enabled", "locked", "lockout", "lockouts", "management", "mode", "agent",
    "agents", "interaction", "input", "settings", "id", "ids", "shows", "sid", "principal",
    "object", "objects", "policy", "policies", "type", "changes", "changed", "control",
    "controls", "request", "requests", "details", "info", "information", "creation", "deletion",
    "enumeration", "discovery", "behavior", "behaviour", "attributes", "attribute", "privileges",
    "privilege", "permissions", "permission", "token", "tokens", "context", "home", "directory",
    "directories", "mapping", "space", "level", "levels", "role", "roles", "email", "emails",
    "status", "state",
)
# fmt: on
_ACCOUNT_WORDS = "(?:" + "|".join(_PROSE_AFTER_ACCOUNT) + ")"

_ACCOUNT_VERBS = (
    "shows|showed|was|is|has|had|logged|failed|authenticated|attempted|tried|accessed|created"
    "|deleted|added|removed|signed|connected|ran|executed|downloaded|uploaded|reset|changed"
)

# Patterns for what Presidio's built-ins do not know; (entity, regex, score, group).
# `group` names the capture group that holds the value to redact (0: the whole match).
SECURITY_PATTERNS: list[tuple[str, str, float, int]] = [
    ("URL_CREDENTIALS", r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:([^\s/@]+)@", 0.9, 1),
    (
        "SECRET",
        rf"(?i){_SECRET_KEYWORD}(?:[_.-]?(?:access|key|value|string|id))*[\"']?\s*[=:]\s*"
        r"[\"']?([^\s\"',;&<]{4,})",
        0.85,
        1,
    ),
    # `-p` is a port, a pid or a process to most tools (`-p 443`, `-p lsass.exe`,
    # `-productVersion`): a password only on the commands that take one there.
    (
        "SECRET",
        r"(?i)\b(?:mysql\w*|mariadb\w*|mongo\w*|7z[ar]?|rar|unrar|zip|unzip|mysqldump)"
        r"(?:\.exe)?\b[^\n|;&]*?\s-[pP]\s*[\"']?([^\s\"'<]{4,})",
        0.8,
        1,
    ),
    ("SECRET", r"(?:^|\s)--password[= ]\s*[\"']?([^\s\"'<]{4,})", 0.8, 1),
    ("SECRET", r"\bsshpass\s+-p\s*[\"']?([^\s\"']+)", 0.9, 1),
    ("SECRET", r"(?:^|\s)(?:-u|--user)[\s=]+[\"']?[^\s:\"']+:([^\s\"']+)", 0.85, 1),
    (
        "SECRET",
        r"(?i)\bauthorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer|token|digest|negotiate|ntlm)"
        r"\s+([A-Za-z0-9._~+/=-]{6,})",
        0.95,
        1,
    ),
    # `net user NAME PASSWORD`: neither may be a switch or markup (`net user /domain</code> to`).
    (
        "SECRET",
        r"(?i)\bnet1?(?:\.exe)?\s+user\s+\"?[^\s\"/<][^\s\"<]*\"?\s+([^\s/*<\\][^\s<]*)",
        0.8,
        1,
    ),
    ("SECRET", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})", 0.95, 0),
    ("SECRET", r"\bgl[a-z]{2,6}-[A-Za-z0-9_-]{20,1024}", 0.9, 0),
    ("SECRET", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", 0.95, 0),
    ("SECRET", TOKEN_PATTERN, 0.95, 0),  # providers' self-identifying token formats
    ("USERNAME", r"(?:^|\s)(?:-u|--user)[\s=]+[\"']?([^\s:\"'-][^\s:\"']*):", 0.8, 1),
    ("USERNAME", r"(?i)\bnet1?(?:\.exe)?\s+user\s+\"?([^\s\"/<]+)\"?\s+(?:[^\s/*<]|/add)", 0.8, 1),
    (
        "USERNAME",
        r"(?i)(?:\b|(?<=[a-z])(?=[A-Z]))(?:user(?:name)?|account(?:\s+name)?|acct|login|name)\s*[=:]\s*\"?(?:[A-Za-z0-9.-]+\\)?([A-Za-z0-9._$-]{2,64})(?![A-Za-z0-9._\\$=-])",
        0.8,
        1,
    ),
    ("USERNAME", r"\b(?:of|for)\s+user\s+([a-z_][a-z0-9._-]{1,31})\b", 0.75, 1),
    # "account jdoe42 …", "user m.ortiz was …": a login-shaped word after the noun, when it
    # has a digit or separator, or a verb follows it (prose: "the user during", "login page").
    (
        "USERNAME",
        r"(?i)\b(?:account|user(?:name)?|login)\s+(?!" + _ACCOUNT_WORDS + r"\b)"
        r"((?=[a-z]*[0-9._-][a-z0-9])[a-z][a-z0-9._-]*[a-z0-9]|[a-z]{3,31}(?=\s+(?:"
        + _ACCOUNT_VERBS
        + r")\b))"
        r"(?![:=(a-z0-9])",
        0.6,
        1,
    ),
    ("USERNAME", r"\bby\s+([a-z_][a-z0-9._-]{1,31})\(uid=", 0.8, 1),
    ("USERNAME", r"\bsudo:\s+([a-z_][a-z0-9._-]{1,31})\s+:", 0.8, 1),
    ("USERNAME", r"\bCRON\[\d+\]:\s+\(([a-z_][a-z0-9._-]{1,31})\)", 0.8, 1),
    (
        "USERNAME",
        r"\b(?:for|by)\s+(?:invalid\s+user\s+)?([a-z_][a-z0-9._-]{1,31})\s+from\s",
        0.7,
        1,
    ),
    ("USERNAME", r"(?i)[A-Z]:\\Users\\([^\\\s\"']+)", 0.85, 1),
    ("USERNAME", r"(?i):(?:user|role|assumed-role)/([A-Za-z0-9+=,.@_-]+)", 0.85, 1),
    ("SECRET", r"(?i)/user:\S+\s+([^\s/;|&]{4,})", 0.6, 1),
    ("USERNAME", r"/home/([a-z_][a-z0-9._-]{1,31})", 0.8, 1),
    # A national identity number where the text names it: a US SSN, or a UK National
    # Insurance number (two letters, six digits, a letter) after "social security number" too.
    (
        "US_SSN",
        r"(?i)\b(?:ssn|social security(?: number| no\.?)?|national insurance(?: number| no\.?)?"
        r"|nino)(?:\s+(?:is|was|number))?\W{0,3}(\d{3}[- ]?\d{2}[- ]?\d{4}"
        r"|(?-i:[A-Z]{2} ?\d{2} ?\d{2} ?\d{2}(?: ?[A-Z])?))\b",
        0.9,
        1,
    ),
    # North American numbers as people write them, separated (a bare run of ten digits is an
    # id as often as a phone): "+1-632-346-8203", "(420)874-3615x11050", "745.749.8601".
    # Presidio's recognizer finds them only with a valid area code.
    (
        "PHONE_NUMBER",
        r"(?<![\w.+-])(?:(?:\+1|001)[-. ]?)?(?:\(\d{3}\) ?|\d{3}[-.])\d{3}[-.]\d{4}"
        r"(?: ?(?:x|ext\.?) ?\d{1,6})?(?!\w|\.\d)",
        0.7,
        0,
    ),
    ("WINDOWS_SID", r"\bS-1-5-21-\d{6,10}-\d{6,10}-\d{6,10}-\d{3,6}\b", 0.95, 0),
    (
        "AWS_ACCOUNT_ID",
        r"(?i)(?:arn:aws[a-z-]*:[a-z0-9-]*:[a-z0-9-]*:|account(?:Id)?\"?\s*[=:]\s*\"?)(\d{12})\b",
        0.9,
        1,
    ),
    ("MAC_ADDRESS", r"\b(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}\b", 0.8, 0),
]


# Payment card numbers: 12-19 digits, optionally in groups, that pass the Luhn check and start
# with an issuer prefix of a length that issuer uses (ISO/IEC 7812 ranges as the networks
# publish them). Presidio's recognizer predates Mastercard's 2-series and misses Maestro,
# 19-digit Visa and 15-digit JCB numbers.
_CARD_RUN = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){11,18}(?!\w|[ -]\d|\.\d)")
_CARD_ISSUERS: tuple[tuple[int, int, range], ...] = (  # (first prefix, last prefix, lengths)
    (4, 4, range(13, 20, 3)),  # Visa: 13, 16, 19
    (51, 55, range(16, 17)),  # Mastercard
    (2221, 2720, range(16, 17)),  # Mastercard 2-series
    (34, 34, range(15, 16)),  # American Express
    (37, 37, range(15, 16)),
    (300, 305, range(14, 20)),  # Diners Club
    (36, 36, range(14, 20)),
    (38, 39, range(16, 20)),
    (6011, 6011, range(16, 20)),  # Discover
    (644, 649, range(16, 20)),
    (65, 65, range(16, 20)),
    (3528, 3589, range(16, 20)),  # JCB
    (2131, 2131, range(15, 16)),
    (1800, 1800, range(15, 16)),
    (62, 62, range(16, 20)),  # UnionPay
    (50, 50, range(12, 20)),  # Maestro
    (56, 69, range(12, 20)),
)


def _is_card_number(digits: str) -> bool:
    from stdnum import luhn  # a trainer dependency, like Presidio's

    issued = any(
        first <= int(digits[: len(str(first))]) <= last and len(digits) in lengths
        for first, last, lengths in _CARD_ISSUERS
    )
    return issued and luhn.is_valid(digits)


def _looks_like_phone(value: str) -> bool:
    """Presidio's phone recognizer also fires on dotted addresses, ports and pids in logs."""
    if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", value.strip()):
        return False
    return sum(c.isdigit() for c in value) >= 9


BASE64_ENTROPY_LIMIT = 4.5
_QUOTED_BASE64 = re.compile(r"([\"'])([A-Za-z0-9+/_-]{20,}={0,2})\1")
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-+/.~")


def _widen_to_token(text: str, start: int, end: int) -> tuple[int, int]:
    """The whole token around a detect-secrets hit: its plugins report a regex's capture group
    (`glpat` of `glpat-…`), and redacting only that leaves the rest of the secret behind.
    Padding `=` belongs to the token on the right only, so `token=abc` keeps `token=`."""
    while start > 0 and text[start - 1] in _TOKEN_CHARS:
        start -= 1
    while end < len(text) and (text[end] in _TOKEN_CHARS or text[end] == "="):
        end += 1
    while end > start and text[end - 1] in ".,":
        end -= 1
    return start, end


ALWAYS_KEPT = {"root", "system", "administrator", "nobody", "localhost", "-", "null", "none"}


@dataclass
class Finding:
    entity: str
    start: int
    end: int
    score: float


@dataclass
class SanitizeReport:
    """Redaction counts per entity type, over every example seen."""

    counts: Counter[str] = field(default_factory=Counter)
    examples_changed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "redactions": dict(sorted(self.counts.items())),
            "examplesChanged": self.examples_changed,
        }


class Sanitizer:
    """Redacts one example (several fields sharing one placeholder map) at a time."""

    def __init__(self, spec: SanitizeSpec) -> None:
        self.spec = spec
        self.report = SanitizeReport()
        self._allowed_networks = []
        self._allowed_values = set(ALWAYS_KEPT)
        for item in spec.allow:
            try:
                self._allowed_networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self._allowed_values.add(item.lower())
        self._internal = [d.lower().lstrip(".") for d in spec.internal_domains]
        self._patterns = [(e, re.compile(p), s, g) for e, p, s, g in SECURITY_PATTERNS]
        if self._internal:
            suffixes = "|".join(re.escape(d) for d in self._internal)
            self._patterns.append(
                (
                    "HOSTNAME",
                    re.compile(rf"(?i)\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:{suffixes})\b"),
                    0.9,
                    0,
                )
            )

    # -- engines, built once ---------------------------------------------------------------

    @cached_property
    def _analyzer(self) -> Any:
        import spacy
        import tldextract
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import (
            CreditCardRecognizer,
            EmailRecognizer,
            IbanRecognizer,
            IpRecognizer,
            PhoneRecognizer,
            UrlRecognizer,
            UsSsnRecognizer,
        )

        # Offline: the bundled public-suffix snapshot, never a fetch.
        tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())
        engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank-en"}])
        engine.nlp = {"en": spacy.blank("en")}  # type: ignore[assignment]
        registry = RecognizerRegistry(supported_languages=["en"])
        for recognizer in (
            CreditCardRecognizer(),
            EmailRecognizer(),
            IbanRecognizer(),
            IpRecognizer(),
            PhoneRecognizer(),
            UrlRecognizer(),
            UsSsnRecognizer(),
        ):
            registry.add_recognizer(recognizer)
        return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=["en"])

    @cached_property
    def _secret_settings(self) -> Any:
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.settings import transient_settings

        # Every plugin this detect-secrets knows, except public IPs (addresses are PII here,
        # with their own allow-list) and the entropy plugins, which report every word when
        # scanning single lines (see _entropy_findings).
        skipped = {"IPPublicDetector", "HexHighEntropyString", "Base64HighEntropyString"}
        known: list[type] = list(get_mapping_from_secret_type_to_class().values())
        plugins = [{"name": c.__name__} for c in known if c.__name__ not in skipped]
        return lambda: transient_settings({"plugins_used": plugins})

    @cached_property
    def _base64_entropy(self) -> Any:
        from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString

        return Base64HighEntropyString(limit=BASE64_ENTROPY_LIMIT)

    # -- finding ---------------------------------------------------------------------------

    def _secret_findings(self, text: str) -> list[Finding]:
        from detect_secrets.core.scan import scan_line

        findings = []
        with self._secret_settings():
            for secret in scan_line(text):
                value = secret.secret_value
                if not value:
                    continue
                for match in re.finditer(re.escape(value), text):
                    start, end = _widen_to_token(text, match.start(), match.end())
                    findings.append(Finding("SECRET", start, end, 1.0))
        findings += self._entropy_findings(text)
        if "PRIVATE KEY-----" in text:
            for match in re.finditer(
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
                text,
                re.S,
            ):
                findings.append(Finding("SECRET", match.start(), match.end(), 1.0))
        return findings

    def _entropy_findings(self, text: str) -> list[Finding]:
        """Quoted base64-looking strings above detect-secrets' entropy limit (its file-scan
        rule). Hex strings are left alone: file hashes are indicators, not secrets."""
        findings = []
        for match in _QUOTED_BASE64.finditer(text):
            value = match.group(2)
            if self._base64_entropy.calculate_shannon_entropy(value) > BASE64_ENTROPY_LIMIT:
                findings.append(Finding("SECRET", match.start(2), match.end(2), 0.7))
        return findings

    def _card_findings(self, text: str) -> list[Finding]:
        return [
            Finding("CREDIT_CARD", m.start(), m.end(), 0.8)
            for m in _CARD_RUN.finditer(text)
            if _is_card_number(re.sub(r"[ -]", "", m.group()))
        ]

    def _pattern_findings(self, text: str) -> list[Finding]:
        findings = []
        for entity, pattern, score, group in self._patterns:
            for match in pattern.finditer(text):
                start, end = match.span(group)
                if start < end:
                    findings.append(Finding(entity, start, end, score))
        return findings

    def _presidio_findings(self, text: str) -> list[Finding]:
        results = self._analyzer.analyze(text=text, language="en", score_threshold=0.3)
        findings = []
        for r in results:
            value = text[r.start : r.end]
            if r.entity_type == "URL" and not self._is_sensitive_url(value):
                continue
            if r.entity_type == "PHONE_NUMBER" and not _looks_like_phone(value):
                continue
            findings.append(Finding(r.entity_type, r.start, r.end, r.score))
        return findings

    def _is_sensitive_url(self, value: str) -> bool:
        # Presidio's URL recognizer also fires on bare words like "cmd.exe"; only hosts under an
        # internal domain are redacted (URLs with credentials are caught as URL_CREDENTIALS).
        lowered = value.lower()
        return any(lowered.endswith(d) or f".{d}/" in lowered for d in self._internal)

    def _allowed(self, entity: str, value: str) -> bool:
        if value.lower() in self._allowed_values:
            return True
        if entity == "USERNAME" and value.count(".") >= 2:
            return True  # "query for update.microsoft.com from": a domain, not a user
        if entity == "IP_ADDRESS":
            try:
                address = ipaddress.ip_address(value.strip("[]"))
            except ValueError:
                return False
            return any(address in net for net in self._allowed_networks)
        return False

    def findings(self, text: str) -> list[Finding]:
        """Non-overlapping findings, the longest (then highest-scoring) one winning."""
        candidates = self._secret_findings(text) + self._pattern_findings(text)
        candidates += self._card_findings(text)
        candidates += self._presidio_findings(text)
        candidates += [Finding("PERSON", a, b, 0.7) for a, b in person_spans(text)]
        candidates = [
            f
            for f in candidates
            if f.entity in PLACEHOLDERS and not self._allowed(f.entity, text[f.start : f.end])
        ]
        candidates.sort(key=lambda f: (-(f.end - f.start), -f.score, f.start))
        chosen: list[Finding] = []
        for finding in candidates:
            if all(finding.end <= c.start or finding.start >= c.end for c in chosen):
                chosen.append(finding)
        return sorted(chosen, key=lambda f: f.start)

    # -- redacting -------------------------------------------------------------------------

    def redact(self, fields: dict[str, str]) -> dict[str, str]:
        """Redact several fields of one example with one placeholder numbering.

        Values are found in context ("for alice from", "User: alice") and then replaced wherever
        they occur in the example, in any letter case, so the expected output of a parsing task
        ({"user": "alice"}) or a later chat message gets the same placeholder as the log line
        it came from.
        """
        if not self.spec.enabled:
            return fields
        entities: dict[str, str] = {}
        found = {name: self.findings(text) for name, text in fields.items()}
        for name, text in fields.items():
            for finding in found[name]:
                entities.setdefault(text[finding.start : finding.end].lower(), finding.entity)
        if not entities:
            return fields
        numbering: dict[str, str] = {}
        per_stem: Counter[str] = Counter()
        for value, entity in entities.items():
            stem = PLACEHOLDERS[entity]
            per_stem[stem] += 1
            numbering[value] = f"<{stem}_{per_stem[stem]}>"
        alternatives = "|".join(re.escape(v) for v in sorted(entities, key=len, reverse=True))
        pattern = re.compile(rf"(?<![A-Za-z0-9_])(?:{alternatives})(?![A-Za-z0-9_])", re.IGNORECASE)

        def replace(match: re.Match[str]) -> str:
            value = match.group(0).lower()
            self.report.counts[entities[value]] += 1
            return numbering[value]

        def redact_field(text: str, findings: list[Finding]) -> str:
            # Where a value was found it is replaced as found, even glued to what precedes it
            # (`-pS3cretPass`, `SSN123-45-6789`); elsewhere only as a whole word.
            pieces, last = [], 0
            for finding in findings:
                pieces.append(pattern.sub(replace, text[last : finding.start]))
                value = text[finding.start : finding.end].lower()
                self.report.counts[entities[value]] += 1
                pieces.append(numbering[value])
                last = finding.end
            pieces.append(pattern.sub(replace, text[last:]))
            return "".join(pieces)

        self.report.examples_changed += 1
        return {name: redact_field(text, found[name]) for name, text in fields.items()}
