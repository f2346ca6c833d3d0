"""Analysts' verdicts: which verdicts fit which answer, what is held and for how long, what is
stored (sanitized, in the training format the data stage reads back), and the writer that
acknowledges a verdict only once its batch is written."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from sectune.config import JobSpec, SanitizeSpec
from sectune.data.prepare import load_examples
from sectune.data.sanitize import Sanitizer
from sectune.serving.config import FeedbackSettings
from sectune.serving.feedback import (
    FeedbackError,
    FeedbackWriter,
    Judgement,
    Prediction,
    PredictionLog,
    VerdictRequest,
    build_record,
    judge,
    new_id,
)
from sectune.serving.metrics import ServingMetrics

LABELS = ("benign", "malicious")
ALERT = "Failed password for alice from 185.220.101.4 port 22; token AKIAIOSFODNN7EXAMPLE"


def classified(output: str = "malicious", **extra: object) -> Prediction:
    return Prediction(
        id=new_id(),
        adapter="triage",
        version="v1",
        task="classification",
        output=output,
        sanitize=SanitizeSpec(),
        labels=LABELS,
        probabilities={"benign": 0.3, "malicious": 0.7},
        fields={"text": ALERT},
        **extra,  # type: ignore[arg-type]
    )


def generated(**given: object) -> Prediction:
    return Prediction(
        id=new_id("chatcmpl-"),
        adapter="writer",
        version="v2",
        task="generation",
        output="Brute force against alice from 185.220.101.4.",
        sanitize=SanitizeSpec(),
        **given,  # type: ignore[arg-type]
    )


def verdict(**fields: object) -> VerdictRequest:
    return VerdictRequest.model_validate({"id": "pred-x", **fields})


# ---------------------------------------------------------------------------- judging


@pytest.mark.parametrize(
    ("prediction", "fields", "field", "message"),
    [
        (classified(), {"label": "suspicious"}, "label", "is not one of the adapter's labels"),
        (classified(), {"verdict": "rejected"}, "label", "needs the correct label"),
        (classified(), {}, "label", "give label"),
        (classified(), {"output": "x"}, "output", "give the correct label"),
        (classified(), {"label": "benign", "verdict": "accepted"}, "verdict", "other than the"),
        (generated(prompt="p"), {"label": "benign"}, "label", "label is for classification"),
        (generated(prompt="p"), {}, "verdict", "give label"),
        (generated(prompt="p"), {"verdict": "accepted", "output": "x"}, "output", "rejected"),
    ],
)
def test_a_verdict_that_does_not_fit_its_answer_is_refused_naming_the_field(
    prediction: Prediction, fields: dict[str, object], field: str, message: str
) -> None:
    with pytest.raises(FeedbackError) as caught:
        judge(prediction, verdict(**fields), "soc")
    assert caught.value.status == 422
    assert caught.value.field == field
    assert message in caught.value.message


def test_what_a_verdict_says_about_the_answer() -> None:
    p = classified("malicious")
    assert judge(p, verdict(label="benign"), "soc").correct is False
    assert judge(p, verdict(label="malicious"), "soc").correct is True
    assert judge(p, verdict(verdict="accepted"), "soc").actual == "malicious"
    g = generated(prompt="summarise")
    assert judge(g, verdict(verdict="accepted"), "soc").correct is True
    corrected = judge(g, verdict(output="Password spraying, not brute force."), "soc")
    assert (corrected.actual, corrected.correct) == ("rejected", False)
    # the same verdict has the same fingerprint; a different one does not
    assert (
        judge(p, verdict(label="benign"), "a").fingerprint
        == judge(p, verdict(label="benign"), "b").fingerprint
    )
    assert (
        judge(p, verdict(label="benign"), "a").fingerprint
        != judge(p, verdict(label="benign", comment="scanner"), "a").fingerprint
    )


def test_the_request_body_is_bounded_and_closed() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="comment"):
        verdict(label="benign", comment="x" * 2001)
    with pytest.raises(ValidationError, match="extra"):
        verdict(label="benign", prediction="malicious")
    with pytest.raises(ValidationError, match="verdict"):
        verdict(verdict="maybe")


# ---------------------------------------------------------------------------- holding


def test_predictions_are_held_for_the_window_then_forgotten() -> None:
    log = PredictionLog(window=60, max_predictions=10)
    old = classified(at=time.time() - 120)
    fresh = classified()
    log.add(old)
    log.add(fresh)
    assert log.get(old.id) is None
    held = log.get(fresh.id)
    assert held is not None and held.prediction is fresh


def test_the_oldest_predictions_go_first_past_the_count_or_memory_bound() -> None:
    log = PredictionLog(window=3600, max_predictions=3)
    predictions = [classified() for _ in range(5)]
    for p in predictions:
        log.add(p)
    assert len(log) == 3
    assert [log.get(p.id) is not None for p in predictions] == [False, False, True, True, True]
    small = PredictionLog(window=3600, max_predictions=100, max_chars=len(ALERT) * 3)
    for p in predictions:
        small.add(p)
    assert 1 <= len(small) < 3
    assert small.get(predictions[-1].id) is not None


# ---------------------------------------------------------------------------- the stored record


def test_a_classification_verdict_is_stored_sanitized_as_a_training_row(tmp_path: Path) -> None:
    p = classified("malicious")
    judgement = judge(
        p,
        verdict(label="benign", reviewer="analyst-7", comment="bob@example.org says: pentest"),
        "soc",
    )
    row = json.loads(build_record(judgement, Sanitizer(SanitizeSpec())).line())
    assert row["label"] == "benign"
    assert "185.220.101.4" not in row["text"] and "AKIAIOSFODNN7EXAMPLE" not in row["text"]
    assert "alice" not in row["text"]
    assert "bob@example.org" not in row["feedback"]["comment"]
    assert row["feedback"] | {"judgedAt": "", "predictedAt": ""} == {
        "adapter": "triage",
        "version": "v1",
        "task": "classification",
        "predicted": "malicious",
        "verdict": "rejected",
        "inputSha256": p.input_sha256,
        "caller": "soc",
        "probabilities": {"benign": 0.3, "malicious": 0.7},
        "reviewer": "analyst-7",
        "comment": row["feedback"]["comment"],
        "judgedAt": "",
        "predictedAt": "",
    }
    # The data stage reads it back as an example of the corrected label.
    path = tmp_path / "verdicts.jsonl"
    path.write_text(json.dumps(row) + "\n")
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/model"},
            "dataset": {"train": f"file://{path}"},
            "task": {"type": "classification", "labels": list(LABELS)},
        }
    )
    problems: list[str] = []
    [example] = load_examples(f"file://{path}", spec, problems, {})
    assert problems == []
    assert (example.id, example.target, example.text) == (p.id, "benign", row["text"])


def test_generation_verdicts_keep_the_answer_to_learn_from() -> None:
    sanitizer = Sanitizer(SanitizeSpec())
    messages = (
        {"role": "system", "content": "You write incident summaries."},
        {"role": "user", "content": ALERT},
    )
    chat = generated(messages=messages)
    accepted = json.loads(
        build_record(judge(chat, verdict(verdict="accepted"), ""), sanitizer).line()
    )
    assert [m["role"] for m in accepted["messages"]] == ["system", "user", "assistant"]
    assert "185.220.101.4" not in json.dumps(accepted)
    rejected = json.loads(
        build_record(judge(chat, verdict(verdict="rejected"), ""), sanitizer).line()
    )
    assert [m["role"] for m in rejected["messages"]] == ["system", "user"]  # nothing to learn
    assert rejected["feedback"]["verdict"] == "rejected"
    completion = generated(prompt=ALERT)
    corrected = json.loads(
        build_record(
            judge(completion, verdict(output="Credential stuffing."), ""), sanitizer
        ).line()
    )
    assert corrected["completion"] == "Credential stuffing."
    assert "alice" not in corrected["prompt"]


# ---------------------------------------------------------------------------- the writer


def _writer(store: str, **settings: object) -> FeedbackWriter:
    return FeedbackWriter(
        FeedbackSettings.model_validate({"store": store, **settings}), ServingMetrics()
    )


def _judged(count: int) -> list[Judgement]:
    return [judge(classified(), verdict(label="benign"), "soc") for _ in range(count)]


def _stored_lines(root: Path) -> list[list[dict[str, object]]]:
    return [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(root.rglob("*.jsonl"))
    ]


def test_verdicts_are_written_in_batches_and_acknowledged_once_stored(tmp_path: Path) -> None:
    writer = _writer(f"file://{tmp_path}/store", batch_size=3, flush_seconds=30)
    futures = [writer.submit(j) for j in _judged(3)]
    for future in futures:
        assert future.result(timeout=10) is None  # a full batch goes at once, not after 30 s
    [batch] = _stored_lines(tmp_path / "store")
    assert len(batch) == 3
    [path] = (tmp_path / "store").rglob("*.jsonl")
    assert path.relative_to(tmp_path / "store").parts[0] == "triage"
    assert path.parent.name.startswith("date=")
    # Fewer than a batch wait at most flushSeconds; close writes what is pending.
    writer.batch_size, writer.flush_seconds = 100, 0.2
    assert writer.submit(_judged(1)[0]).result(timeout=10) is None
    writer.flush_seconds = 60
    last = writer.submit(_judged(1)[0])
    writer.close()
    assert last.result(timeout=1) is None
    assert sorted(len(b) for b in _stored_lines(tmp_path / "store")) == [1, 1, 3]
    assert writer.metrics.feedback_writes.labels("stored")._value.get() == 5


def test_a_batch_that_cannot_be_written_is_not_acknowledged(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("a file where the store's folder should be")
    writer = _writer(f"file://{tmp_path}/store", batch_size=2, flush_seconds=0.1)
    futures = [writer.submit(j) for j in _judged(2)]
    for future in futures:
        with pytest.raises(OSError):
            future.result(timeout=10)
    writer.close()
    assert writer.metrics.feedback_writes.labels("failed")._value.get() == 2


# ---------------------------------------------------------------------------- training on them


def _store_verdicts(folder: Path, judgements: list[Judgement]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sanitizer = Sanitizer(SanitizeSpec())
    lines = [build_record(j, sanitizer).line() for j in judgements]
    (folder / "20261203T000000Z-aaaa.jsonl").write_text("\n".join(lines) + "\n")


def test_a_job_trains_on_verdicts_but_never_evaluates_on_them(tmp_path: Path) -> None:
    from sectune.data.prepare import prepare_data

    rows = [
        {"id": f"r{i}", "text": f"event {i} from host-{i}", "label": LABELS[i % 2]}
        for i in range(20)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:16]) + "\n")
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows[16:]) + "\n")

    def answered(text: str, label: str, days_ago: float = 0) -> Judgement:
        p = Prediction(
            id=new_id(), adapter="triage", version="v1", task="classification",
            output="malicious", sanitize=SanitizeSpec(), labels=LABELS,
            fields={"text": text}, at=time.time() - days_ago * 86400,
        )  # fmt: skip
        j = judge(p, verdict(label=label), "soc")
        return Judgement(j.prediction, j.request, j.actual, j.caller, at=p.at)

    fresh = [answered(f"new beacon pattern {i}", "benign") for i in range(3)]
    judgements = [
        *fresh,
        answered("old pattern", "benign", days_ago=400),  # expired
        answered(rows[17]["text"], "benign"),  # a validation row's input
        answered("relabelled twice", "malicious", days_ago=2),  # superseded by the next
        answered("relabelled twice", "benign"),
    ]
    _store_verdicts(tmp_path / "verdicts" / "triage", judgements)
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/model"},
            "dataset": {
                "train": f"file://{tmp_path}/train.jsonl",
                "validation": f"file://{tmp_path}/valid.jsonl",
                "feedback": {
                    "uri": f"file://{tmp_path}/verdicts/triage",
                    "weight": 2,
                    "holdOut": 0.25,
                },
                "quality": {"audit": False},
            },
            "task": {"type": "classification", "labels": list(LABELS)},
        }
    )
    prepared = prepare_data(spec)
    report = prepared.report.sources["feedback"]
    # 4 usable verdicts: the newest (a quarter) held out for gates on verdicts, 3 trained on
    assert (report["rows"], report["used"], report["examples"], report["heldOut"]) == (7, 3, 6, 1)
    [newest] = prepared.verdicts
    assert newest.id == judgements[-1].prediction.id and newest.target == "benign"
    assert report["leftOut"] == {"expired": 1, "heldOutOverlapping": 1, "superseded": 1}
    verdict_ids = {j.prediction.id for j in judgements}
    held_out = {e.id.split("~")[0] for e in [*prepared.validation, *prepared.test]}
    assert not held_out & verdict_ids
    trained = Counter(
        e.id.split("~")[0] for e in prepared.train if e.id.split("~")[0] in verdict_ids
    )
    assert set(trained) == {j.prediction.id for j in fresh}  # the newest is held out
    assert set(trained.values()) == {2}  # weight 2: each verdict twice
    # The lineage digest covers the verdicts: another verdict, another digest.
    _store_verdicts(tmp_path / "verdicts" / "triage" / "more", [answered("later", "benign")])
    assert prepare_data(spec).report.digest != prepared.report.digest


def test_feedback_is_refused_for_formats_it_cannot_fill() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not implemented yet for format instruction"):
        JobSpec.model_validate(
            {
                "baseModel": {"uri": "hf://org/model"},
                "dataset": {
                    "train": "s3://b/train.jsonl",
                    "format": "instruction",
                    "feedback": {"uri": "s3://b/verdicts/writer"},
                },
                "task": {"type": "generation"},
            }
        )


def test_gates_on_verdicts_read_the_held_out_verdicts_and_say_when_there_are_none() -> None:
    from sectune.config import Gate
    from sectune.evaluation.gates import evaluate_gates

    gates = [
        Gate.model_validate({"metric": "macroF1", "basis": "verdicts", "min": 0.7}),
        Gate.model_validate(
            {"metric": "macroF1", "basis": "verdicts", "overBaseline": "previous", "min": 0}
        ),
        Gate.model_validate({"metric": "macroF1", "min": 0.7}),
    ]
    tuned, baselines = {"macroF1": 0.9}, {"previous": {"macroF1": 0.5}}
    verdicts = {"tuned": {"macroF1": 0.6}, "previous": {"macroF1": 0.65}}
    outcomes = evaluate_gates(gates, tuned, baselines, verdicts)
    assert [(o.name, o.passed, round(o.value or 0, 4)) for o in outcomes] == [
        ("macroF1@verdicts>=0.7", False, 0.6),
        ("macroF1-over-previous@verdicts>=0", False, -0.05),
        ("macroF1>=0.7", True, 0.9),
    ]
    [missing, *_] = evaluate_gates(gates, tuned, baselines, None)
    assert not missing.passed and "no verdicts were held out" in (missing.reason or "")


@pytest.mark.parametrize(
    ("dataset", "gate", "message"),
    [
        (
            {},
            {"metric": "accuracy", "basis": "verdicts", "min": 0.5},
            "set dataset.feedback.holdOut",
        ),
        (
            {"feedback": {"uri": "s3://b/v/triage"}},
            {"metric": "accuracy", "basis": "verdicts", "min": 0.5},
            "set dataset.feedback.holdOut",
        ),
        (
            {"feedback": {"uri": "s3://b/v/triage", "holdOut": 0.2}},
            {"metric": "accuracy", "basis": "verdicts", "overBaseline": "tfidf", "min": 0},
            "basis: verdicts compares only with the previous version",
        ),
    ],
)
def test_a_verdict_gate_without_verdicts_to_judge_is_refused(
    dataset: dict[str, object], gate: dict[str, object], message: str
) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate(
            {
                "baseModel": {"uri": "hf://org/model"},
                "dataset": {"train": "s3://b/train.jsonl", **dataset},
                "task": {"type": "classification", "labels": list(LABELS)},
                "evaluation": {"gates": [gate]},
            }
        )


def test_an_answer_id_names_the_replica_holding_it_by_a_tag_of_its_address() -> None:
    import asyncio

    from sectune.serving.feedback import new_id
    from sectune.serving.peers import Peers, id_tag, tag

    a, b = "10.0.0.7:8000", "10.0.0.8:8000"
    peers = Peers(own=a, fixed=(a, b))
    answer = new_id("chatcmpl-", tag(b))
    assert id_tag(answer) == tag(b) and "10.0.0.8" not in answer
    assert asyncio.run(peers.holder(answer)) == b
    # This replica's own answers, ids without a tag and unknown tags are not passed on.
    assert asyncio.run(peers.holder(new_id("", tag(a)))) is None
    assert asyncio.run(peers.holder("pred-0123")) is None
    assert asyncio.run(peers.holder(new_id("", tag("10.0.0.9:8000")))) is None


def test_peers_behind_a_service_are_its_dns_addresses() -> None:
    import asyncio

    from sectune.serving.peers import Peers

    found = asyncio.run(Peers(own="10.0.0.7:8000", service="localhost", port=8123).addresses())
    assert "127.0.0.1:8123" in found
