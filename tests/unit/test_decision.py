"""Decisions that weigh a missed threat above a false alarm: thresholds fitted to reach each
recall target, checked in order; figures cross-fitted so no row is decided by a rule fitted
on it; gates on them."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from sectune.config import Gate, JobSpec
from sectune.contract import DecisionRule
from sectune.evaluation import decision
from sectune.evaluation.gates import evaluate_gates

LABELS = ["low", "high", "critical"]


def _rows(n: int, seed: int = 0) -> tuple[list[list[float]], list[str]]:
    """A model that under-calls `critical`: its probability for true criticals is often below
    the other labels'."""
    rng = random.Random(seed)
    probabilities, truth = [], []
    for i in range(n):
        label = LABELS[i % 3]
        p = [rng.random() * 0.6 for _ in LABELS]
        p[LABELS.index(label)] += 0.3 if label == "critical" else 0.6
        total = sum(p)
        probabilities.append([x / total for x in p])
        truth.append(label)
    return probabilities, truth


def _recall(decided: list[str], truth: list[str], label: str) -> float:
    rows = [d for d, t in zip(decided, truth, strict=True) if t == label]
    return sum(d == label for d in rows) / len(rows)


def test_the_fitted_rule_reaches_the_target_where_argmax_does_not():
    probabilities, truth = _rows(300)
    argmax = [LABELS[max(range(3), key=p.__getitem__)] for p in probabilities]
    rule = decision.fit(probabilities, truth, LABELS, {"critical": 0.95})
    decided = [LABELS[rule.decide(p, LABELS)] for p in probabilities]
    assert _recall(argmax, truth, "critical") < 0.9
    assert _recall(decided, truth, "critical") >= 0.95
    # ... at the cost of precision, which the report shows next to it
    crossed = decision.evaluate(probabilities, truth, LABELS, {"critical": 0.95}, seed=1)
    per_class = crossed["crossFitted"]["perClass"]["critical"]
    assert per_class["recall"] >= 0.9  # out of sample: near the target, not at it by design
    assert per_class["precision"] < 1.0
    assert crossed["rule"]["order"] == ["critical"]


def test_cross_fitted_rows_are_decided_by_a_rule_fitted_on_the_other_half():
    probabilities, truth = _rows(60)
    decided = decision.cross_fitted(probabilities, truth, LABELS, {"critical": 1.0}, seed=3)
    assert len(decided) == 60 and set(decided) <= set(LABELS)
    # A rule fitted on all rows with target 1.0 catches every critical; fitted on the other
    # half it need not: the cross-fitted figure is the honest one.
    full = decision.fit(probabilities, truth, LABELS, {"critical": 1.0})
    assert _recall([LABELS[full.decide(p, LABELS)] for p in probabilities], truth, "critical") == 1


def test_targets_are_checked_in_their_order_and_argmax_decides_the_rest():
    rule = DecisionRule(thresholds={"critical": 0.3, "high": 0.2}, order=["critical", "high"])
    assert rule.decide([0.3, 0.4, 0.3], LABELS) == 2  # critical reaches 0.3 first
    assert rule.decide([0.5, 0.25, 0.25], LABELS) == 1  # high reaches 0.2
    assert rule.decide([0.9, 0.05, 0.05], LABELS) == 0  # neither: argmax


def test_gates_read_the_decision_and_refuse_what_cannot_work():
    tuned = {
        "macroF1": 0.7,
        "decision": {"crossFitted": {"perClass": {"critical": {"recall": 0.93}}}},
    }
    gate = Gate.model_validate(
        {"metric": "recall", "class": "critical", "basis": "decision", "min": 0.95}
    )
    [outcome] = evaluate_gates([gate], tuned, {})
    assert (outcome.name, outcome.passed, outcome.value) == (
        "recall[critical]@decision>=0.95", False, 0.93,
    )  # fmt: skip
    [missing] = evaluate_gates([gate], {"macroF1": 0.7}, {})
    assert not missing.passed and "task.recallTargets" in (missing.reason or "")
    spec = {
        "baseModel": {"uri": "hf://org/model"},
        "dataset": {"train": "s3://b/train.jsonl"},
        "task": {"type": "classification", "labels": LABELS},
        "evaluation": {"gates": [gate.model_dump(by_alias=True, exclude_none=True)]},
    }
    with pytest.raises(ValidationError, match="basis: decision reads the rule"):
        JobSpec.model_validate(spec)
    with pytest.raises(ValidationError, match=r"'urgent' is not one of task\.labels"):
        JobSpec.model_validate(spec | {"task": spec["task"] | {"recallTargets": {"urgent": 0.9}}})
    accepted = spec | {"task": spec["task"] | {"recallTargets": {"critical": 0.95}}}
    assert JobSpec.model_validate(accepted).task.recall_targets == {"critical": 0.95}


def test_recall_targets_on_the_command_line_name_a_bad_item():
    from sectune.cli import _recall_targets

    assert _recall_targets("critical=0.95, high=0.9") == {"critical": 0.95, "high": 0.9}
    assert _recall_targets(None) is None
    for bad in ("critical", "critical=high", "=0.9"):
        with pytest.raises(ValueError, match=f"--recall-targets '{bad}'"):
            _recall_targets(bad)
