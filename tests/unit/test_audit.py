"""The data audit on data nobody here wrote (MITRE ATT&CK procedure examples shipped in
examples/attack-tactics): planted label flips and planted edited copies of held-out rows are
found; dataset.quality limits fail the job naming the field; the review round trip writes a
new version with its provenance record and refuses a bad review file whole."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest

from sectune.config import JobSpec
from sectune.data.audit import DataQualityError, audit, check_limits, shingles, truncation
from sectune.data.example import Example
from sectune.data.load import DataError
from sectune.data.prepare import prepare_data
from sectune.data.review import apply_review, provenance_for, review_rows, write_review
from support.edits import edited_copy

ATTACK = Path(__file__).parents[2] / "examples" / "attack-tactics" / "data"
TACTICS = [
    "Reconnaissance",
    "Resource Development",
    "Initial Access",
    "Execution",
    "Persistence",
    "Privilege Escalation",
    "Defense Evasion",
    "Credential Access",
    "Discovery",
    "Lateral Movement",
    "Collection",
    "Command and Control",
    "Exfiltration",
    "Impact",
]


def _rows(name: str, count: int) -> list[dict[str, Any]]:
    lines = (ATTACK / name).read_text().splitlines()[:count]
    return [{k: r[k] for k in ("id", "text", "label")} for r in map(json.loads, lines)]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec(train: Path, test: Path | None = None, **quality: Any) -> JobSpec:
    dataset: dict[str, Any] = {"train": f"file://{train}", "quality": quality}
    if test is not None:
        dataset |= {"validation": f"file://{test}"}
    return JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/model"},
            "dataset": dataset,
            "task": {"type": "classification", "labels": TACTICS},
        }
    )


def _examples(rows: list[dict[str, Any]]) -> list[Example]:
    return [Example(r["id"], {"text": r["text"]}, r["label"]) for r in rows]


def test_planted_label_flips_are_found_most_suspect_first():
    rows = _rows("train.jsonl", 2000)
    rng = random.Random(7)
    flipped = set(rng.sample(range(len(rows)), 100))  # 5 %
    for i in flipped:
        rows[i]["label"] = rng.choice([t for t in TACTICS if t != rows[i]["label"]])
    planted = {rows[i]["id"] for i in flipped}

    result = audit(_examples(rows), [], _spec(Path("unused.jsonl")))

    found = [issue.id for issue in result.label_errors]
    assert result.label_errors_total == len(found)
    recall = len(planted & set(found)) / len(planted)
    precision_at_100 = len(planted & set(found[:100])) / 100
    # Measured on this sample: recall 0.80, precision among the top 100 0.60 (BENCHMARKS has
    # the full training set); a random ranking would put ~5 planted rows in the top 100.
    assert recall >= 0.7, recall
    assert precision_at_100 >= 0.45, precision_at_100
    issue = next(i for i in result.label_errors if i.id in planted)
    original = _rows("train.jsonl", 2000)[[r["id"] for r in rows].index(issue.id)]["label"]
    assert issue.given != original and issue.suggested in TACTICS
    assert 0 < issue.confidence <= 1 and issue.label_quality < issue.confidence


def test_every_planted_edited_copy_of_a_held_out_row_is_found(tmp_path):
    train, held = _rows("train.jsonl", 1500), _rows("validation.jsonl", 300)
    baseline = audit(_examples(train), _examples(held), _spec(Path("x")))
    copies = [
        {"id": f"copy-{i}", "text": edited_copy(held[i]["text"], i % 3), "label": held[i]["label"]}
        for i in range(0, 300, 6)  # 50 copies
    ]
    result = audit(_examples(train + copies), _examples(held), _spec(Path("x")))

    leaked = {pair.id: pair.other for pair in result.leaked}
    for i in range(0, 300, 6):
        assert leaked.get(held[i]["id"], "").startswith("copy-") or held[i]["id"] in {
            p.id for p in baseline.leaked
        }, held[i]["text"]
    assert result.leaked_total >= 50
    assert all(pair.similarity >= 0.8 for pair in result.leaked)


def test_near_identical_inputs_with_different_labels_are_conflicts():
    rows = _rows("train.jsonl", 300)
    twin = dict(
        rows[10], id="twin", label="Impact" if rows[10]["label"] != "Impact" else "Execution"
    )
    result = audit(_examples([*rows, twin]), [], _spec(Path("x")))
    conflict = next(p for p in result.conflicts if p.id == "twin")
    assert conflict.other == rows[10]["id"] and set(conflict.labels or ()) == {
        rows[10]["label"],
        twin["label"],
    }
    assert result.summary().conflicting == result.conflicts_total >= 1


def test_shingles_ignore_placeholder_numbers_and_case():
    assert shingles("Login by <USER_1>  from <IP_2>") == shingles("login by <USER_7> from <IP_3>")


def test_coverage_counts_labels_lengths_and_minimums():
    rows = _rows("train.jsonl", 400)
    result = audit(_examples(rows), _examples(_rows("validation.jsonl", 100)), _spec(Path("x")))
    cov = result.coverage
    assert sum(c["train"] for c in cov.labels.values()) == 400
    assert sum(c["heldOut"] for c in cov.labels.values()) == 100
    assert cov.labels_under_minimum == [t for t in TACTICS if cov.labels[t]["train"] < 10]
    assert cov.length["train"].rows == 400 and cov.length["train"].p10 <= cov.length["train"].p90
    assert 0 <= (cov.length_shift or 0) < 0.3
    assert not cov.train_under_minimum


def test_truncation_reports_share_of_prompt_lost_per_label():
    examples = _examples(_rows("train.jsonl", 4))
    cut = truncation(examples, [100, 40, 300, 10], [5, 5, 5, 5], 64, labelled=True)
    assert cut.rows_cut == 2 and cut.share_cut == 0.5
    assert cut.max_share_lost == pytest.approx((300 + 5 - 64) / 300, abs=1e-3)
    assert sum(cut.by_label.values()) == 2
    unlabelled = truncation(examples, [100, 40, 300, 10], [5, 5, 5, 5], 64, labelled=False)
    assert unlabelled.by_label == {}


def test_a_broken_quality_limit_fails_prepare_naming_the_field(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows("train.jsonl", 600))
    held = _rows("validation.jsonl", 100)
    leaky = _rows("train.jsonl", 600) + [
        {"id": f"copy-{i}", "text": edited_copy(held[i]["text"], 0), "label": held[i]["label"]}
        for i in range(20)
    ]
    train = _write(tmp_path / "leaky.jsonl", leaky)
    test = _write(tmp_path / "held.jsonl", held)

    with pytest.raises(DataQualityError) as raised:
        prepare_data(_spec(train, test, maxLeakage=0.05))
    assert "dataset.quality.maxLeakage:" in str(raised.value)
    assert raised.value.audit.summary().leaked_held_out >= 20
    assert raised.value.audit.summary().broken_limits

    # Reported, not enforced, without the limit; the held-out rows stay (scored both ways).
    data = prepare_data(_spec(train, test))
    assert data.audit is not None and len(data.leaked_ids()) >= 20
    assert any("nearly duplicate a training row" in w for w in data.report.warnings)


def test_minimums_warn_and_fail_only_when_enforced(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows("train.jsonl", 150))
    spec = _spec(train, enforceMinimums=True)
    with pytest.raises(DataQualityError, match=r"minTrainExamples: .* under 200"):
        prepare_data(spec)
    data = prepare_data(_spec(train))
    assert any("a model will likely overfit" in w for w in data.report.warnings)
    assert data.report.audit["coverage"]["trainUnderMinimum"] is True


def test_limits_need_the_audit_and_label_limits_need_classification():
    with pytest.raises(ValueError, match="need audit: true"):
        _spec(Path("x"), audit=False, maxLeakage=0.1)
    with pytest.raises(ValueError, match="for task type classification only"):
        JobSpec.model_validate(
            {
                "baseModel": {"uri": "hf://org/model"},
                "dataset": {
                    "train": "file:///x.jsonl",
                    "format": "instruction",
                    "quality": {"maxLabelErrors": 0.1},
                },
                "task": {"type": "generation"},
            }
        )


def test_check_limits_names_each_broken_limit():
    result = audit(_examples(_rows("train.jsonl", 300)), [], _spec(Path("x")))
    settings = _spec(Path("x"), maxLabelErrors=0.0, maxConflicting=0.5).dataset.quality
    broken = check_limits(result, settings)
    assert len(broken) == (1 if result.label_errors_total else 0)
    assert all(b.startswith("dataset.quality.maxLabelErrors:") for b in broken)


# --------------------------------------------------------------------------- review round trip


def _audited(tmp_path: Path) -> tuple[Path, Any, list[dict[str, str]]]:
    rows = _rows("train.jsonl", 400)
    for i in range(0, 400, 20):  # 20 planted flips
        rows[i]["label"] = "Impact" if rows[i]["label"] != "Impact" else "Discovery"
    data = _write(tmp_path / "train.jsonl", rows)
    examples = _examples(rows)
    for e, r in zip(examples, range(len(rows)), strict=True):
        e.where = f"file://{data}:{r + 1}"
    result = audit(examples, [], _spec(data))
    return data, result, review_rows(result, {e.id: e for e in examples})


def test_review_file_lists_flagged_rows_with_sanitized_text_and_blank_decisions(tmp_path):
    _, result, lines = _audited(tmp_path)
    csv_path, jsonl_path = write_review(lines, tmp_path / "review")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(lines) >= result.label_errors_total or 0
    first = next(line for line in read if "label-error" in line["finding"])
    assert first["suggested"] in TACTICS
    assert first["decision"] == "" and first["where"].endswith(
        ":" + first["where"].rsplit(":", 1)[1]
    )
    assert [json.loads(x)["row"] for x in jsonl_path.read_text().splitlines()] == [
        r["row"] for r in read
    ]


def _decide(lines: list[dict[str, str]], path: Path) -> Path:
    decided = []
    for n, line in enumerate(lines):
        decision = ["relabel", "drop", "keep"][n % 3]
        decided.append(
            line
            | {
                "decision": decision,
                "newLabel": line["suggested"] if decision == "relabel" else "",
                "comment": "checked against ATT&CK" if n == 0 else "",
            }
        )
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(decided[0]))
        writer.writeheader()
        writer.writerows(decided)
    return path


def test_review_apply_writes_a_new_version_and_its_provenance(tmp_path):
    data, _, lines = _audited(tmp_path)
    review = _decide(
        [line for line in lines if line["finding"] == "label-error"], tmp_path / "r.csv"
    )
    out = tmp_path / "reviewed.jsonl"

    record = apply_review(f"file://{data}", review, f"file://{out}", "analyst-7", labels=TACTICS)

    before = {r["id"]: r for r in map(json.loads, data.read_text().splitlines())}
    after = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    drops = [c.row for c in record.changes if c.decision == "drop"]
    relabels = {c.row: c.new_label for c in record.changes if c.decision == "relabel"}
    assert drops and relabels
    assert set(before) - set(after) == set(drops)
    assert all(after[row]["label"] == label for row, label in relabels.items())
    assert all(after[r] == before[r] for r in after if r not in relabels)
    assert record.counts["drop"] == len(drops) and record.reviewer == "analyst-7"
    stored = json.loads((tmp_path / "reviewed.jsonl.provenance.json").read_text())
    assert stored["result"]["sha256"] == record.result.sha256
    assert [c["comment"] for c in stored["changes"] if c["comment"]] == ["checked against ATT&CK"]

    summary = provenance_for(f"file://{out}")
    assert summary is not None and summary["matchesData"] and summary["reviewer"] == "analyst-7"
    out.write_text(out.read_text() + out.read_text().splitlines()[0] + "\n")  # edited afterwards
    assert provenance_for(f"file://{out}")["matchesData"] is False  # type: ignore[index]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"decision": "dorp"}, "decision 'dorp' is not one of keep, relabel, drop"),
        ({"decision": "relabel", "newLabel": ""}, "decision relabel needs newLabel"),
        ({"decision": "relabel", "newLabel": "Lunch"}, "newLabel 'Lunch' is not one of"),
        ({"row": "relationship--not-there"}, "is not in the data file"),
    ],
)
def test_a_bad_review_line_is_named_and_nothing_is_written(tmp_path, change, message):
    data, _, lines = _audited(tmp_path)
    review = _decide(lines[:6], tmp_path / "r.csv")
    rows = list(csv.DictReader(review.open()))
    rows[3] |= change
    with review.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "reviewed.jsonl"

    with pytest.raises(DataError) as raised:
        apply_review(f"file://{data}", review, f"file://{out}", "analyst-7", labels=TACTICS)
    assert f"{review}:5: " in str(raised.value) and message in str(raised.value)
    assert "nothing was written" in str(raised.value)
    assert not out.exists() and not (tmp_path / "reviewed.jsonl.provenance.json").exists()


def test_a_row_decided_twice_is_refused(tmp_path):
    data, _, lines = _audited(tmp_path)
    review = _decide([lines[0], lines[0] | {"decision": "drop"}], tmp_path / "r.jsonl")
    review.write_text("".join(json.dumps(r) + "\n" for r in csv.DictReader(review.open())))
    with pytest.raises(DataError, match=r"r.jsonl:2: row .* was already decided at .*r.jsonl:1"):
        apply_review(f"file://{data}", review, f"file://{tmp_path}/o.jsonl", "a", labels=TACTICS)


def test_a_reviewed_version_is_referenced_by_the_next_jobs_data_report(tmp_path):
    data, _, lines = _audited(tmp_path)
    review = _decide([x for x in lines if x["finding"] == "label-error"], tmp_path / "r.csv")
    out = tmp_path / "reviewed.jsonl"
    record = apply_review(f"file://{data}", review, f"file://{out}", "analyst-7", labels=TACTICS)

    prepared = prepare_data(_spec(out))

    provenance = prepared.report.provenance
    assert provenance["reviewer"] == "analyst-7" and provenance["matchesData"] is True
    assert provenance["source"]["sha256"] == record.source.sha256
    assert not any("changed after its review" in w for w in prepared.report.warnings)
