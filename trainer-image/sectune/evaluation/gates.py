"""Quality gates: each metric the user named, its value, threshold and pass/fail."""

from __future__ import annotations

from typing import Any

from sectune.config import Gate
from sectune.contract import GateOutcome

PER_CLASS = {"precision", "recall", "f1"}


def _lookup(metrics: dict[str, Any], gate: Gate) -> float | None:
    if gate.metric in PER_CLASS:
        per_class = metrics.get("perClass", {}).get(gate.class_name or "", {})
        value = per_class.get(gate.metric)
    else:
        value = metrics.get(gate.metric)
    return None if value is None else float(value)


def evaluate_gates(
    gates: list[Gate],
    tuned: dict[str, Any],
    baselines: dict[str, dict[str, Any]],
    verdicts: dict[str, dict[str, Any]] | None = None,
) -> list[GateOutcome]:
    """Check every gate against the tuned model's metrics (or its margin over a baseline);
    a gate `basis: verdicts` against `verdicts` (tuned, previous: the held-out analysts'
    verdicts). A metric that was not measured fails its gate, saying so."""
    outcomes = []
    for gate in gates:
        measured, compared = tuned, baselines
        if gate.basis == "verdicts":
            measured = (verdicts or {}).get("tuned", {})
            compared = {"previous": (verdicts or {}).get("previous", {})}
        elif gate.basis == "decision":
            measured = tuned.get("decision", {}).get("crossFitted", {})
        value = _lookup(measured, gate)
        reason = ""
        if gate.basis == "verdicts" and not measured:
            reason = "no verdicts were held out to judge (dataset.feedback.holdOut)"
        elif gate.basis == "decision" and not measured:
            reason = "no decision rule was fitted (task.recallTargets)"
        elif value is not None and gate.over_baseline:
            base = _lookup(compared.get(gate.over_baseline, {}), gate)
            if base is None:
                value, reason = None, f"baseline {gate.over_baseline} was not measured"
            else:
                value = value - base
        elif value is None:
            reason = f"metric {gate.metric} was not measured for this task"
        passed = (
            value is not None
            and (gate.min is None or value >= gate.min)
            and (gate.max is None or value <= gate.max)
        )
        outcomes.append(
            GateOutcome(
                name=gate.name,
                metric=gate.metric,
                value=value,
                min=gate.min,
                max=gate.max,
                passed=passed,
                # Set only when there is one, so report.json leaves it out otherwise.
                **({"reason": reason} if reason else {}),
            )
        )
    return outcomes


BASELINES_FROM = "training time: the job's held-out set, not re-measured here"
"""Where a later evaluation's baselines come from (said in its report)."""


def gate_verdict(outcomes: list[GateOutcome]) -> tuple[bool, str]:
    """Whether all gates passed, and the one-line verdict the report and CLI show."""
    if not outcomes:
        return True, "no gates set"
    failing = [g.name for g in outcomes if not g.passed]
    return not failing, "gates failed: " + ", ".join(failing) if failing else "all gates passed"
