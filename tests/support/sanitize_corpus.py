"""The labelled sanitization corpus: security log lines, alerts and chat transcripts with planted
secrets (one kind per detect-secrets plugin, plus command-line and header forms) and personal
data, and clean lines that must come out unchanged.

`python -m tests.support.sanitize_corpus` rewrites tests/data/sanitize-corpus.jsonl from a fixed
seed (Faker for names, addresses, numbers; hand-written templates around them). `score` runs a
sanitizer over it and counts, per planted type, how many values no longer appear anywhere in the
output (recall), and how many clean lines it changed (false positives).
"""

# Each generator is a lambda whose default arguments draw its values: the table is rebuilt for
# every row, so every row gets fresh values from the seeded generators.
# ruff: noqa: B008

from __future__ import annotations

import base64
import json
import random
import string
from collections import Counter
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parents[1] / "data" / "sanitize-corpus.jsonl"
INTERNAL_DOMAINS = ["corp.example.com"]
PER_TYPE = 24


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits
LOWER_ALNUM = string.ascii_lowercase + string.digits
HEX = "0123456789abcdef"
AREA_CODES = (212, 206, 303, 312, 404, 415, 512, 617, 702, 713, 801, 919)
URLSAFE = ALNUM + "-_"


def _secret_generators(rng: random.Random, fake: Any) -> dict[str, list[Any]]:
    """type -> list of callables returning (text, value)."""

    def b64(n: int) -> str:
        return base64.b64encode(rng.randbytes(n)).decode()

    def pem() -> str:
        return b64(48)

    def host() -> str:
        return fake.domain_word() + "-" + str(rng.randint(1, 99))

    return {
        "AWSKeyDetector": [
            lambda v="AKIA" + _rand(rng, string.ascii_uppercase + string.digits, 16): (
                f"CloudTrail: CreateAccessKey returned accessKeyId {v} for a service user",
                v,
            ),
        ],
        "AzureStorageKeyDetector": [
            lambda v=b64(66): (
                f"DefaultEndpointsProtocol=https;AccountName=logs{rng.randint(1, 9)};AccountKey={v};",
                v,
            ),
        ],
        "BasicAuthDetector": [
            lambda v=fake.password(length=12, special_chars=False): (
                f"GET https://svc:{v}@{host()}.example.net/api/v1/export 200",
                v,
            ),
        ],
        "ArtifactoryDetector": [
            lambda v="AKC" + _rand(rng, ALNUM, 60): (f"artifactory token: {v} used by build", v),
        ],
        "CloudantDetector": [
            lambda a=fake.user_name(), v=_rand(rng, LOWER_ALNUM, 64): (
                f"replication target https://{a}:{v}@{a}.cloudant.com/db failed",
                v,
            ),
        ],
        "DiscordBotTokenDetector": [
            lambda v="M" + _rand(rng, URLSAFE, 23) + "." + _rand(rng, URLSAFE, 6) + "." + _rand(rng, URLSAFE, 27): (
                f"exfil bot connected with token {v}",
                v,
            ),
        ],
        "GitHubTokenDetector": [
            lambda v="ghp_" + _rand(rng, ALNUM, 36): (
                f"git clone https://github.com/acme/infra with token {v} from CI runner",
                v,
            ),
        ],
        "GitLabTokenDetector": [
            lambda v="glpat-" + _rand(rng, URLSAFE, 20): (f"export GITLAB_TOKEN={v}", v),
        ],
        "IbmCloudIamDetector": [
            lambda v=_rand(rng, URLSAFE, 44): (f'ibm_cloud_iam_api_key = "{v}"', v),
        ],
        "IbmCosHmacDetector": [
            lambda v=_rand(rng, HEX, 48): (f'cos secret_access_key = "{v}"', v),
        ],
        "JwtTokenDetector": [
            lambda: _jwt(rng, fake),
        ],
        "KeywordDetector": [
            lambda v=fake.password(length=14): (f'db_password = "{v}" in settings.py', v),
        ],
        "MailchimpDetector": [
            lambda v=_rand(rng, HEX, 32) + "-us" + str(rng.randint(1, 20)): (
                f"newsletter sync with key {v} started",
                v,
            ),
        ],
        "NpmDetector": [
            lambda v="npm_" + _rand(rng, ALNUM, 36): (
                f"//registry.npmjs.org/:_authToken={v}",
                v,
            ),
        ],
        "OpenAIDetector": [
            lambda v="sk-" + _rand(rng, ALNUM, 20) + "T3BlbkFJ" + _rand(rng, ALNUM, 20): (
                f"OPENAI_API_KEY={v} found in a public gist",
                v,
            ),
        ],
        "PrivateKeyDetector": [
            lambda v=pem(): (
                f"-----BEGIN RSA PRIVATE KEY-----\n{v}\n-----END RSA PRIVATE KEY-----",
                v,
            ),
        ],
        "PypiTokenDetector": [
            lambda v="pypi-AgEIcHlwaS5vcmc" + _rand(rng, URLSAFE, 80): (
                f"twine upload -p {v} dist/*",
                v,
            ),
        ],
        "SendGridDetector": [
            lambda v="SG." + _rand(rng, URLSAFE, 22) + "." + _rand(rng, URLSAFE, 43): (
                f"mailer configured with {v}",
                v,
            ),
        ],
        "SlackDetector": [
            lambda v=f"xoxb-{rng.randint(10**10, 10**11)}-{rng.randint(10**10, 10**11)}-{_rand(rng, LOWER_ALNUM, 24)}": (
                f"slack webhook poster authenticated as {v}",
                v,
            ),
        ],
        "SoftlayerDetector": [
            lambda v=_rand(rng, LOWER_ALNUM, 64): (f'softlayer_api_key = "{v}"', v),
        ],
        "SquareOAuthDetector": [
            lambda v="sq0csp-" + _rand(rng, URLSAFE, 43): (f"square secret {v} rotated", v),
        ],
        "StripeDetector": [
            lambda v="sk_live_" + _rand(rng, ALNUM, 24): (f"charge API called with {v}", v),
        ],
        "TelegramBotTokenDetector": [
            lambda v=f"{rng.randint(10**8, 10**9)}:{_rand(rng, URLSAFE, 35)}": (
                f"C2 over Telegram, bot token {v}",
                v,
            ),
        ],
        "TwilioKeyDetector": [
            lambda v="AC" + _rand(rng, LOWER_ALNUM, 32): (f"sms gateway sid {v}", v),
        ],
        "Base64HighEntropyString": [
            lambda v=b64(30): (f'config: {{"signing": "{v}"}}', v),
        ],
        # Forms the plugins miss, seen in command lines and headers.
        "CommandLinePassword": [
            lambda v=fake.password(length=12, special_chars=False): (
                f"CommandLine: curl -u deploy:{v} https://{host()}.example.net/upload",
                v,
            ),
            lambda v=fake.password(length=12, special_chars=False): (
                f"bash history: sshpass -p '{v}' ssh root@10.2.{rng.randint(0, 255)}.4",
                v,
            ),
            lambda v=fake.password(length=12, special_chars=False): (
                f"Process Create: net user svc_backup {v} /add",
                v,
            ),
        ],
        "AuthorizationHeader": [
            lambda v=b64(24): (f"request headers: Authorization: Basic {v}", v),
            lambda v=_rand(rng, URLSAFE, 40): (f'"Authorization": "Bearer {v}"', v),
        ],
        "SecretAssignment": [
            lambda v=_rand(rng, ALNUM + "/+", 40): (f"aws_secret_access_key = {v}", v),
            lambda v=_rand(rng, ALNUM, 32): (f"client_secret: {v}", v),
        ],
    }


def _jwt(rng: random.Random, fake: Any) -> tuple[str, str]:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    token = ".".join(
        [
            part({"alg": "HS256", "typ": "JWT"}),
            part({"sub": fake.user_name(), "iat": rng.randint(10**9, 2 * 10**9)}),
            _rand(rng, URLSAFE, 43),
        ]
    )
    return f"proxy log: cookie session={token}; path=/", token


def _pii_generators(rng: random.Random, fake: Any) -> dict[str, list[Any]]:
    def ip() -> str:
        return f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"

    return {
        "EMAIL_ADDRESS": [
            lambda v=fake.email(): (f"Phishing reported by {v} via the button", v),
        ],
        "IP_ADDRESS": [
            lambda v=ip(): (f"Failed password for root from {v} port 52311 ssh2", v),
        ],
        "PHONE_NUMBER": [
            lambda v=f"+1 {rng.choice(AREA_CODES)}-{rng.randint(200, 999)}-{rng.randint(1000, 9999)}": (
                f"Caller at {v} asked the help desk to reset MFA",
                v,
            ),
        ],
        "CREDIT_CARD": [
            lambda v=fake.credit_card_number(card_type="visa16"): (
                f"DLP: card number {v} in an outbound e-mail",
                v,
            ),
        ],
        "IBAN_CODE": [
            lambda v=fake.iban(): (f"Wire fraud attempt to IBAN {v} blocked", v),
        ],
        "MAC_ADDRESS": [
            lambda v=fake.mac_address(): (f"DHCPACK on 10.0.0.7 to {v} via eth0", v),
        ],
        "USERNAME": [
            lambda v=fake.user_name(): (f"sshd[811]: Accepted publickey for {v} from 10.1.1.9", v),
            lambda v=fake.user_name(): (f"EventID 4625 TargetUserName={v} LogonType=3", v),
        ],
        "HOSTNAME": [
            lambda v=f"{fake.domain_word()}-{rng.randint(1, 99)}.corp.example.com": (
                f"Beacon from {v} to a new domain",
                v,
            ),
        ],
        "AWS_ACCOUNT_ID": [
            lambda v=str(rng.randint(10**11, 10**12 - 1)): (
                f"arn:aws:iam::{v}:role/Admin assumed from a new ASN",
                v,
            ),
        ],
        "WINDOWS_SID": [
            lambda v=f"S-1-5-21-{rng.randint(10**9, 4 * 10**9)}-{rng.randint(10**9, 4 * 10**9)}-{rng.randint(10**9, 4 * 10**9)}-{rng.randint(1000, 9999)}": (
                f"SubjectUserSid: {v}",
                v,
            ),
        ],
        "US_SSN": [
            lambda v=fake.ssn(): (f"HR export contained SSN {v} in plain text", v),
        ],
        "PERSON": [
            lambda v=fake.name(): (f"Analyst {v} closed the ticket as benign.", v),
            lambda v=f"{fake.first_name()} {fake.last_name()}": (
                f"Escalated to {v} at 02:10 UTC; no response.",
                v,
            ),
        ],
    }


HARD_CASES: list[dict[str, Any]] = [
    {"text": "Dr. Okonkwo approved the exception for the finance share.",
     "planted": [{"type": "PERSON", "value": "Okonkwo"}]},
    {"text": "Ms. Nkechi Eze reported the laptop stolen.",
     "planted": [{"type": "PERSON", "value": "Nkechi Eze"}]},
    {"text": "curl -u admin:Winter2024x https://10.0.4.2/api",
     "planted": [{"type": "CommandLinePassword", "value": "Winter2024x"}]},
    {"text": "net.exe user helpdesk Qwerty!234 /add /domain",
     "planted": [{"type": "CommandLinePassword", "value": "Qwerty!234"}]},
    {"text": "ALICE logged in at 09:00; later alice.w failed MFA. User: Alice",
     "planted": [{"type": "USERNAME", "value": "Alice"}]},
]  # fmt: skip

CLEAN_LINES = [
    "Process C:\\Windows\\System32\\svchost.exe started with PID 4312 by NT AUTHORITY\\SYSTEM",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 matched a known loader",
    "md5 d41d8cd98f00b204e9800998ecf8427e seen on 3 hosts",
    "Failed password for root from 203.0.113.5 port 22 ssh2",
    "Sigma rule 'Suspicious Encoded PowerShell Command Line' fired (T1059.001)",
    "Windows Defender quarantined Trojan:Win32/Emotet.RT!MTB",
    "Cobalt Strike beacon sleep 60000 jitter 20 observed",
    "Grant Access policy updated for the VPN group; Mark as resolved.",
    "APT29 used spearphishing links to deliver payloads (T1566.002)",
    "Fancy Bear and Lazarus Group infrastructure overlap was not confirmed",
    "DNS query for update.microsoft.com from 192.0.2.15 allowed",
    "firewall: DROP TCP 198.51.100.7:443 -> 203.0.113.9:51515",
    "kubelet: Liveness probe failed: HTTP probe failed with statuscode: 503",
    "nginx: 200 GET /healthz 0.002s",
    "EventID 4688 NewProcessName=C:\\Windows\\System32\\cmd.exe TokenElevationType=%%1936",
    "Will check the alert tomorrow after the May patch window.",
    "Chrome updated to 131.0.6778.86 on 42 endpoints",
    "CVE-2024-3400 exploitation attempt blocked by the WAF",
    "Scheduled task \\Microsoft\\Windows\\UpdateOrchestrator\\Reboot ran",
    "YARA rule APT_Loader_Stage2 matched 2 files in C:\\ProgramData",
    "Jenkins build 4411 finished: SUCCESS",
    "The password policy requires 14 characters and MFA for admins.",
    "Token bucket rate limiter dropped 12 requests per second",
    "Azure AD sign-in from a new country, risk level medium",
    "Summary: 3 alerts, 0 incidents, mean time to triage 14 minutes",
    "Suricata ET POLICY curl User-Agent Outbound to 198.51.100.20",
    "Ransom note README.txt dropped in 140 folders",
    "AWS GuardDuty finding Recon:EC2/PortProbeUnprotectedPort severity 2",
    "PowerShell ScriptBlock logging enabled via GPO",
    "Rule triggered: Mimikatz command line sekurlsa::logonpasswords",
]


def build(seed: int = 7) -> list[dict[str, Any]]:
    from faker import Faker

    rng = random.Random(seed)
    fake = Faker("en_US")
    Faker.seed(seed)
    rows: list[dict[str, Any]] = []
    for group in (_secret_generators, _pii_generators):
        for kind, makers in group(rng, fake).items():
            for i in range(PER_TYPE):
                # Default arguments are drawn once per lambda: rebuild for fresh values.
                text, value = group(rng, fake)[kind][i % len(makers)]()
                rows.append({"text": text, "planted": [{"type": kind, "value": value}]})
    # Chat transcripts: the same user and host named in several messages.
    for _ in range(PER_TYPE):
        user, name = fake.user_name(), fake.name()
        messages = [
            {"role": "user", "content": f"Account {user} shows impossible travel. Owner is {name}."},
            {"role": "assistant", "content": f"Disable {user} and call {name.split()[0]} first."},
            {"role": "user", "content": f"Done, {user.upper()} is disabled."},
        ]  # fmt: skip
        rows.append(
            {
                "messages": messages,
                "planted": [{"type": "USERNAME", "value": user}, {"type": "PERSON", "value": name}],
            }
        )
    rows += HARD_CASES
    rows += [{"text": line, "planted": []} for line in CLEAN_LINES]
    return rows


def score(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Recall per planted type and changed clean lines, with the sanitizer the docs describe
    (default SanitizeSpec plus the internal domain the corpus uses)."""
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    sanitizer = Sanitizer(SanitizeSpec(internal_domains=INTERNAL_DOMAINS))
    found: Counter[str] = Counter()
    planted: Counter[str] = Counter()
    missed: dict[str, list[str]] = {}
    clean_changed: list[str] = []
    for row in rows:
        if "messages" in row:
            fields = {f"m{i}": m["content"] for i, m in enumerate(row["messages"])}
        else:
            fields = {"text": row["text"]}
        output = " ".join(sanitizer.redact(fields).values()).lower()
        if not row["planted"] and output != " ".join(fields.values()).lower():
            clean_changed.append(row["text"])
        for item in row["planted"]:
            planted[item["type"]] += 1
            if item["value"].lower() in output:
                missed.setdefault(item["type"], []).append(item["value"])
            else:
                found[item["type"]] += 1
    return {
        "recall": {t: found[t] / planted[t] for t in sorted(planted)},
        "planted": dict(planted),
        "missed": missed,
        "cleanLines": sum(1 for r in rows if not r["planted"]),
        "cleanChanged": clean_changed,
    }


def load() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    CORPUS.parent.mkdir(parents=True, exist_ok=True)
    rows = build()
    CORPUS.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {CORPUS}")
