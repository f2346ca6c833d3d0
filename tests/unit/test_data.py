"""Data stage: row validation messages, sanitization of real-looking logs, splits, formatting."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sectune.config import JobSpec, SanitizeSpec
from sectune.data.example import Example
from sectune.data.format import IGNORE, PromptFormatter
from sectune.data.load import DataError
from sectune.data.prepare import deduplicate, prepare_data, stratified_split
from sectune.data.sanitize import Sanitizer

SECRET_TEXT = "Failed password for alice from 10.9.8.7"


def _spec(train: Path, **overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "baseModel": {"uri": "hf://org/model"},
        "dataset": {"train": f"file://{train}", "validationSplit": 0.25},
        "task": {"type": "classification", "labels": ["benign", "malicious"]},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value}
    return JobSpec.model_validate(spec)


def _write(tmp_path: Path, lines: list[str], name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = [
    json.dumps(
        {"id": f"g{i}", "text": f"event {i} {SECRET_TEXT}", "label": ["benign", "malicious"][i % 2]}
    )
    for i in range(8)
]

# (bad line, text the error must contain); the bad row is always line 9 of train.jsonl.
BAD_ROWS = [
    ('{"id": "x", "text": "a", "label": "benign"', "malformed JSON"),
    ('["a list", "not an object"]', "expected a JSON object, got a list"),
    ('{"id": "x", "label": "benign"}', "field 'text' is missing"),
    ('{"id": "x", "text": "", "label": "benign"}', "field 'text' is empty"),
    ('{"id": "x", "text": "   ", "label": "benign"}', "field 'text' is empty"),
    ('{"id": "x", "text": 42, "label": "benign"}', "field 'text' must be a string, got a int"),
    ('{"id": "x", "text": ["a"], "label": "benign"}', "field 'text' must be a string, got a list"),
    ('{"id": "x", "text": "a"}', "field 'label' is missing"),
    ('{"id": "x", "text": "a", "label": null}', "field 'label' is missing"),
    ('{"id": "x", "text": "a", "label": "suspicious"}', "a 10-character label that is not in"),
    ('{"id": "x", "text": "a", "label": "Benign"}', "differs from 'benign' in case"),
    # a secret in the label column never reaches the message (status, Events)
    ('{"id": "x", "text": "a", "label": "AKIAIOSFODNN7EXAMPLE"}', "a 20-character label"),
    ('{"id": "x", "text": "a", "label": 1}', "field 'label' must be a string"),
    ('{"id": "g1", "text": "dup", "label": "benign"}', "duplicate id (first seen at"),
    (
        '{"id": {"nested": 1}, "text": "a", "label": "benign"}',
        "field 'id' must be a string or integer",
    ),
    (
        '{"id": "x", "text": "a", "label": "' + "y" * 100 + '"}',
        "a 100-character label that is not in task.labels",
    ),
    ('"just a string"', "expected a JSON object, got a str"),
    ('{"id": "x", "text": "a", "label": ""}', "field 'label' is empty"),
]


@pytest.mark.parametrize(("line", "message"), BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_row_error_names_file_line_and_field(tmp_path, line, message):
    train = _write(tmp_path, [*GOOD, line])
    with pytest.raises(DataError) as error:
        prepare_data(_spec(train))
    text = str(error.value)
    assert f"{train}:9: " in text
    assert message in text
    assert "dataset.onInvalid: skip" in text
    assert SECRET_TEXT not in text  # never echo example text
    assert "AKIAIOSFODNN7EXAMPLE" not in text and "'g1'" not in text


def test_skip_policy_reports_what_was_skipped(tmp_path):
    train = _write(tmp_path, [*GOOD, BAD_ROWS[0][0], BAD_ROWS[9][0]])
    data = prepare_data(_spec(train, dataset={"onInvalid": "skip"}))
    assert data.report.skipped_rows == 2
    assert [r.split(": ", 1)[0] for r in data.report.skipped["rows"]] == [
        f"file://{train}:9",
        f"file://{train}:10",
    ]
    assert len(data.train) + len(data.validation) == len(GOOD)


def test_csv_rows_are_validated_with_line_numbers(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,text,label\n1,hello,benign\n2,world,unknown\n")
    with pytest.raises(DataError, match=r"train.csv:3: field 'label': a 7-character label"):
        prepare_data(_spec(path))


def test_parquet_rows_load(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    rows = [
        {"id": str(i), "text": f"t{i} words here", "label": ["benign", "malicious"][i % 2]}
        for i in range(8)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    data = prepare_data(_spec(path))
    assert len(data.train) + len(data.validation) == 8


# --------------------------------------------------------------------------- sanitization

SYSMON = (
    "Sysmon EventID 1: Image=C:\\Users\\jsmith\\AppData\\Local\\Temp\\payload.exe "
    'CommandLine="net use \\\\fs01.corp.example.com\\c$ /user:CORP\\jsmith Summer2024!" '
    "User=CORP\\jsmith Hashes=SHA256=AB12 ParentImage=C:\\Windows\\explorer.exe "
    "SID S-1-5-21-3623811015-3361044348-30300820-1013 from 10.20.30.40 MAC 00:1a:2b:3c:4d:5e"
)
AUTH_LOG = (
    "Nov 23 07:01:02 bastion sshd[4242]: Failed password for invalid user oracle from "
    "203.0.113.50 port 50122 ssh2; Nov 23 07:01:09 bastion sshd[4242]: Accepted password for "
    "oracle from 198.18.0.9 port 50124 ssh2"
)
CLOUDTRAIL = json.dumps(
    {
        "eventName": "CreateAccessKey",
        "userIdentity": {
            "arn": "arn:aws:iam::123456789012:user/ops-admin",
            "accountId": "123456789012",
        },
        "sourceIPAddress": "2001:db8:85a3::8a2e:370:7334",
        "requestParameters": {"userName": "ops-admin"},
        "responseElements": {"accessKey": {"accessKeyId": "AKIAIOSFODNN7EXAMPLE"}},
        "contact": "sec-team@example.org",
    }
)


@pytest.fixture(scope="module")
def sanitizer() -> Sanitizer:
    return Sanitizer(SanitizeSpec(internal_domains=["corp.example.com"]))


def test_sysmon_line(sanitizer):
    out = sanitizer.redact({"text": SYSMON})["text"]
    for raw in (
        "jsmith",
        "Summer2024!",
        "fs01.corp.example.com",
        "S-1-5-21-3623811015",
        "10.20.30.40",
        "00:1a:2b:3c:4d:5e",
    ):
        assert raw not in out
    assert "C:\\Users\\<USER_1>\\AppData" in out
    assert "User=CORP\\<USER_1>" in out  # same user, same placeholder
    assert "<SID_1>" in out and "<MAC_1>" in out and "<HOST_1>" in out and "<IP_1>" in out


def test_auth_log_keeps_documentation_addresses_and_links_the_user(sanitizer):
    out = sanitizer.redact({"text": AUTH_LOG})["text"]
    assert "invalid user <USER_1> from 203.0.113.50" in out  # RFC 5737 range is allow-listed
    assert "Accepted password for <USER_1> from <IP_1>" in out
    assert "oracle" not in out and "198.18.0.9" not in out


def test_cloudtrail_json(sanitizer):
    out = sanitizer.redact({"text": CLOUDTRAIL})["text"]
    for raw in (
        "123456789012",
        "ops-admin",
        "2001:db8:85a3::8a2e:370:7334",
        "AKIAIOSFODNN7EXAMPLE",
        "sec-team@example.org",
    ):
        assert raw not in out
    parsed = json.loads(out)  # still valid JSON
    assert parsed["userIdentity"]["arn"] == "arn:aws:iam::<AWS_ACCOUNT_1>:user/<USER_1>"
    assert parsed["requestParameters"]["userName"] == "<USER_1>"
    assert parsed["responseElements"]["accessKey"]["accessKeyId"] == "<SECRET_1>"


def test_placeholders_are_shared_between_input_and_target(sanitizer):
    out = sanitizer.redact(
        {
            "text": "Accepted password for dave from 10.1.1.1 port 2",
            "target": '{"user": "dave", "ip": "10.1.1.1"}',
        }
    )
    assert json.loads(out["target"]) == {"user": "<USER_1>", "ip": "<IP_1>"}


def test_private_key_and_url_credentials(sanitizer):
    text = "curl https://svc:hunter2pass@10.0.0.5/x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
    out = sanitizer.redact({"text": text})["text"]
    assert "hunter2pass" not in out and "MIIEow" not in out


def test_redaction_counts_per_entity_type():
    sanitizer = Sanitizer(SanitizeSpec())
    sanitizer.redact({"text": "from 10.1.1.1 and 10.1.1.2 mail a@b.io"})
    assert sanitizer.report.counts == Counter({"IP_ADDRESS": 2, "EMAIL_ADDRESS": 1})


def test_disabled_sanitizer_changes_nothing():
    assert Sanitizer(SanitizeSpec(enabled=False)).redact({"t": AUTH_LOG}) == {"t": AUTH_LOG}


def test_prepared_data_is_sanitized_before_anything_reads_it(tmp_path):
    train = _write(tmp_path, GOOD)
    data = prepare_data(_spec(train))
    texts = [e.text for e in data.train + data.validation]
    assert all("alice" not in t and "10.9.8.7" not in t for t in texts)
    assert data.report.redactions == {"IP_ADDRESS": 8, "USERNAME": 8}


# --------------------------------------------------------------------------- split and dedup


def _examples(counts: dict[str, int]) -> list[Example]:
    return [
        Example(
            f"{label}-{i}", {"text": f"{label} sample number {i} with unique words {i * 7}"}, label
        )
        for label, n in counts.items()
        for i in range(n)
    ]


def test_stratified_split_keeps_every_label_on_both_sides():
    train, held = stratified_split(_examples({"a": 50, "b": 10, "c": 2}), 0.2, seed=1)
    assert Counter(e.target for e in held) == {"a": 10, "b": 2, "c": 1}
    assert Counter(e.target for e in train) == {"a": 40, "b": 8, "c": 1}


def test_split_is_reproducible_by_seed():
    examples = _examples({"a": 30, "b": 30})
    assert [e.id for e in stratified_split(examples, 0.2, 3)[1]] == [
        e.id for e in stratified_split(examples, 0.2, 3)[1]
    ]
    assert [e.id for e in stratified_split(examples, 0.2, 3)[1]] != [
        e.id for e in stratified_split(examples, 0.2, 4)[1]
    ]


def test_exact_and_near_duplicates_are_removed():
    base = "the adversary used scheduled tasks to run the loader every hour on the finance servers"
    examples = [
        Example("1", {"text": base}, "a"),
        Example("2", {"text": base.upper() + "!"}, "a"),  # exact after normalisation
        Example("3", {"text": base + " again"}, "a"),  # near duplicate
        Example("4", {"text": "completely different text about dns tunnelling"}, "a"),
    ]
    kept, exact, near = deduplicate(examples)
    assert [e.id for e in kept] == ["1", "4"]
    assert (exact, near) == (1, 1)


def test_class_balance_warns_about_rare_labels(tmp_path):
    rows = [json.dumps({"text": f"common event {i}", "label": "benign"}) for i in range(40)]
    rows += [json.dumps({"text": f"rare event {i}", "label": "malicious"}) for i in range(4)]
    data = prepare_data(_spec(_write(tmp_path, rows)))
    assert data.report.class_balance == {"benign": 30, "malicious": 3}
    assert any("'malicious' has 3 training examples" in w for w in data.report.warnings)


def test_canaries_are_inserted_and_recorded(tmp_path):
    data = prepare_data(
        _spec(_write(tmp_path, GOOD), dataset={"canaries": {"count": 2, "repeats": 3}})
    )
    canaries = [e for e in data.train if e.canary]
    assert len(canaries) == 6
    assert {e.text for e in canaries} == set(data.canaries)
    assert all(c.startswith("the backup vault code is ") for c in data.canaries)


# --------------------------------------------------------------------------- formatting


def test_classification_target_is_the_label_and_only_it_is_learned(tiny_tokenizer, tmp_path):
    spec = _spec(tmp_path / "unused.jsonl", task={"systemPrompt": "Rate it."})
    formatter = PromptFormatter(tiny_tokenizer, spec)
    encoded = formatter.encode(Example("1", {"text": "Failed password for <USER_1>"}, "malicious"))
    assert encoded is not None
    learned = [
        t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE
    ]
    assert tiny_tokenizer.decode(learned) == "malicious<|im_end|>\n"
    prompt = tiny_tokenizer.decode(encoded.input_ids[: len(encoded.input_ids) - len(learned)])
    assert (
        prompt
        == "<|im_start|>system\nRate it.<|im_end|>\n<|im_start|>user\nFailed password for <USER_1><|im_end|>\n<|im_start|>assistant\n"
    )


def test_too_long_examples_are_truncated_or_dropped(tiny_tokenizer, tmp_path):
    long_example = Example("1", {"text": "word " * 400}, "benign")
    truncating = PromptFormatter(
        tiny_tokenizer, _spec(tmp_path / "t.jsonl", hyperparameters={"maxSeqLength": 64})
    )
    encoded = truncating.encode(long_example)
    assert encoded is not None and encoded.truncated and len(encoded.input_ids) == 64
    assert tiny_tokenizer.decode(
        [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE]
    ).startswith("benign")
    dropping = PromptFormatter(
        tiny_tokenizer,
        _spec(
            tmp_path / "t.jsonl",
            hyperparameters={"maxSeqLength": 64},
            dataset={"onTooLong": "drop"},
        ),
    )
    assert dropping.encode(long_example) is None


def test_chat_rows_learn_only_the_last_assistant_turn(tiny_tokenizer, tmp_path):
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://o/m"},
            "dataset": {"train": "file:///x.jsonl", "format": "chat"},
            "task": {"type": "generation"},
        }
    )
    messages = [
        {"role": "system", "content": "Summarise."},
        {"role": "user", "content": "3 failed logins then success"},
        {"role": "assistant", "content": "possible brute force"},
    ]
    encoded = PromptFormatter(tiny_tokenizer, spec).encode(
        Example("1", {}, "possible brute force", messages)
    )
    assert encoded is not None
    learned = [
        t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE
    ]
    assert tiny_tokenizer.decode(learned) == "possible brute force<|im_end|>\n"


def test_sanitizer_never_touches_the_network(monkeypatch):
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    sanitizer = Sanitizer(SanitizeSpec(internal_domains=["corp.example.com"]))
    out = sanitizer.redact(
        {"text": "mail ops@corp.example.com from https://build.corp.example.com/x and 10.0.0.9"}
    )
    assert "<EMAIL_1>" in out["text"] and "<IP_1>" in out["text"]


def test_a_classification_label_is_never_redacted(tmp_path: Path):
    """A label that also names a user in the input ("...files for user execution.") stays the
    label; only the input is redacted (the label used to become '<USER_1>')."""
    text = "Saint Bear used malicious websites to host links to malicious files for user execution."
    rows = [json.dumps({"id": f"r{i}", "text": text, "label": "Execution"}) for i in range(4)]
    rows += [
        json.dumps({"id": f"b{i}", "text": f"benign {i}", "label": "Impact"}) for i in range(4)
    ]
    spec = _spec(_write(tmp_path, rows), task={"labels": ["Execution", "Impact"]})
    data = prepare_data(spec)
    examples = data.train + data.validation + data.test
    assert {e.target for e in examples} <= {"Execution", "Impact"}
    assert any("<USER_1>" in e.fields["text"] for e in examples)


@pytest.mark.parametrize(
    ("line", "secret", "entity"),
    [
        ("mysql -u root -pS3cretPass -h db01", "S3cretPass", "SECRET"),
        ("sshpass -pHunter22 ssh backup@db01", "Hunter22", "SECRET"),
        ("applicant SSN123-45-6789 on file", "123-45-6789", "US_SSN"),
    ],
)
def test_a_value_glued_to_its_flag_is_replaced_and_counted(line, secret, entity):
    """Found values were once left in place when a letter preceded them (the replacement
    wanted a word boundary), and not counted: the secret went into training."""
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    sanitizer = Sanitizer(SanitizeSpec())
    redacted = sanitizer.redact({"text": line, "output": f'{{"password": "{secret}"}}'})
    assert secret not in redacted["text"] and secret not in redacted["output"]
    assert sanitizer.report.counts[entity] == 2  # the log line and the expected output


@pytest.mark.parametrize(
    ("sentence", "value", "placeholder"),
    [
        # Card numbers Presidio's recognizer predates: Mastercard 2-series, Maestro, 19-digit Visa.
        ("Need to see last 10 transaction of card 2251314562087095", "2251314562087095", "CARD"),
        ("withdraw money from ATM with the card 579996228303", "579996228303", "CARD"),
        ("My card 4110704341925412249 is expiring", "4110704341925412249", "CARD"),
        ("card 4111 1111 1111 1111 was declined", "4111 1111 1111 1111", "CARD"),
        ("His social security number is ZZ 84 56 70 T", "ZZ 84 56 70 T", "SSN"),
        ("national insurance number: QQ123456C on file", "QQ123456C", "SSN"),
        ("Can someone call me on 001-886-384-1269x611?", "001-886-384-1269x611", "PHONE"),
        ("stop receiving messages to +1-632-346-8203", "+1-632-346-8203", "PHONE"),
        ("ticket from Jürgen Schröder about the VPN", "Jürgen Schröder", "PERSON"),
        ("My name is Cory", "Cory", "PERSON"),
        ("escalated to ms. Corey for review", "Corey", "PERSON"),
        ("we need to add Valentina Verdejo Tovar as guardian", "Tovar", "PERSON"),
    ],
)
def test_personal_data_in_shapes_from_outside_templates_is_redacted(sentence, value, placeholder):
    """Shapes the out-of-sample benchmark (Presidio's templates, Faker's values) showed were
    missed: each is replaced by its typed placeholder."""
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    redacted = Sanitizer(SanitizeSpec()).redact({"text": sentence})["text"]
    assert value not in redacted and f"<{placeholder}_1>" in redacted


@pytest.mark.parametrize(
    "line",
    [
        "EventRecordID 4111111111111112 logged",  # 16 digits failing the Luhn check
        "epoch_ms=1733212800123 pid=4242",  # a timestamp, not an issuer's number
        "Alert: Arbitrary Shell Command Execution Via Settingcontent-Ms\nLog source: windows",
        "kernel 5.15.0-105-generic build 10.0.19041.1234",
    ],
)
def test_numbers_and_words_shaped_like_personal_data_stay(line):
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    assert Sanitizer(SanitizeSpec()).redact({"text": line})["text"] == line


@pytest.mark.parametrize(
    "token",
    [
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",  # Stripe's documented example secret key
        "npm_1234567890abcdefghijklmnopqrstuvwxyz",
        "xapp-1-A0123456789-1234567890123-abcdef0123456789abcdef0123456789",
        "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZaBcDeFgH",
        "dop_v1_" + "a1" * 32,
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    ],
)
def test_a_self_identifying_token_is_redacted_bare_in_a_log_line(token):
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    line = f"10:14:07 proxy: upstream rejected {token} from 10.20.0.7"
    redacted = Sanitizer(SanitizeSpec()).redact({"text": line})["text"]
    assert token not in redacted and "<SECRET_1>" in redacted


@pytest.mark.parametrize(
    "line",
    [
        # Each of these once had a word or markup redacted as a password or secret.
        "Turla has used <code>net user /domain</code> to enumerate domain accounts.",
        "Chimera has used <code>net user Administrator</code> to enumerate domain accounts.",
        "using <code>/usr/bin/sw_vers -productVersion</code> to pick the payload",
        'selection: {"CommandLine|contains": [" -p lsass.exe ", " -m comsvcs "]}',
        "search the registry for stored credentials: <code>Get-UnattendedInstallFile</code>",
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 dropped",
        "session 123e4567-e89b-12d3-a456-426614174000 closed; " + "A" * 96,
    ],
)
def test_clean_security_text_keeps_its_words(line):
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer

    assert "<SECRET_" not in Sanitizer(SanitizeSpec()).redact({"text": line})["text"]
