"""The sanitizer against its labelled corpus (tests/support/sanitize_corpus.py): every planted
type is removed at least 95 % of the time, and clean security lines come out unchanged."""

from __future__ import annotations

import pytest

from sectune.config import JobSpec, SanitizeSpec
from sectune.data.example import Example
from sectune.data.prepare import sanitize_examples
from sectune.data.sanitize import Sanitizer
from support.sanitize_corpus import CLEAN_LINES, build, load, score

RECALL_BAR = 0.95


@pytest.fixture(scope="module")
def result():
    return score(load())


def test_corpus_file_is_what_the_generator_writes():
    assert load() == build(), "regenerate with: python -m tests.support.sanitize_corpus"


def test_every_planted_type_meets_the_recall_bar(result):
    below = {t: r for t, r in result["recall"].items() if r < RECALL_BAR}
    assert not below, f"recall below {RECALL_BAR}: {below}; missed: {result['missed']}"
    # every detect-secrets plugin and every PII type the docs list is in the corpus
    assert {"GitHubTokenDetector", "JwtTokenDetector", "PERSON", "US_SSN"} <= set(result["recall"])
    assert len(result["recall"]) >= 38


def test_clean_security_lines_are_left_alone(result):
    assert result["cleanLines"] == len(CLEAN_LINES)
    assert result["cleanChanged"] == []


@pytest.mark.parametrize(
    ("line", "kept", "gone"),
    [
        ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 pushed", "pushed", "ghp_"),
        ("export GITLAB=glpat-Abcdefghij1234567890xyz", "export", "Abcdefghij"),
        ("curl -u admin:S3cretPass! https://x", "curl -u", "S3cretPass"),
        ("Authorization: Basic YWRtaW46cGFzc3dvcmQ=", "Authorization: Basic", "YWRtaW46"),
        ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "=", "wJalr"),
        ("net user backdoor P@ssw0rd123 /add", "/add", "P@ssw0rd123"),
        ("sshpass -p 'Hunter2xx' ssh root@host", "sshpass -p", "Hunter2xx"),
        ("Analyst John Smith reviewed the alert", "reviewed", "John Smith"),
        ("HR file lists SSN 536-90-4399", "HR file", "536-90-4399"),
        (
            "session eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36P",
            "session",
            "eyJ",
        ),
    ],
)
def test_reproduced_leaks_are_redacted(line, kept, gone):
    out = Sanitizer(SanitizeSpec()).redact({"t": line})["t"]
    assert kept in out and gone not in out, out


def test_a_value_is_redacted_in_every_case_and_every_chat_message():
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///d.jsonl", "format": "chat"},
            "task": {"type": "generation"},
        }
    )
    example = Example("1", {}, "", messages=[
        {"role": "user", "content": "Failed login for user=alice.w from 10.9.8.7"},
        {"role": "assistant", "content": "Lock ALICE.W and check 10.9.8.7."},
        {"role": "user", "content": "Alice.W says it was her."},
    ])  # fmt: skip
    sanitize_examples([example], spec)
    contents = [m["content"] for m in example.messages]
    assert not any("alice" in c.lower() or "10.9.8.7" in c for c in contents), contents
    assert all("<USER_1>" in c for c in contents)
