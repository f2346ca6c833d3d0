"""Decisions that weigh a missed threat above a false alarm (`task.recallTargets`): per-label
thresholds over the model's probabilities, fitted on held-out rows so that each named label
reaches its recall target, checked in the order the targets are listed, argmax otherwise.

The figures reported for the rule are cross-fitted: the held-out rows are split in two
(stratified, seeded), thresholds fitted on one half decide the other, and the other way
round, so no row is scored by a rule fitted on it. The rule stored with the version (and
applied by the server) is fitted on all of them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from sectune.contract import DecisionRule


def fit(
    probabilities: Sequence[Sequence[float]],
    truth: Sequence[str],
    labels: Sequence[str],
    targets: dict[str, float],
) -> DecisionRule:
    """The highest threshold per label that keeps its recall on these rows at its target
    (a label with no rows here gets none: argmax decides it)."""
    thresholds: dict[str, float] = {}
    for label, target in targets.items():
        column = labels.index(label)
        scores = sorted(p[column] for p, t in zip(probabilities, truth, strict=True) if t == label)
        if not scores:
            continue
        may_miss = math.floor((1 - target) * len(scores) + 1e-9)
        thresholds[label] = scores[min(may_miss, len(scores) - 1)]
    return DecisionRule(thresholds=thresholds, order=[t for t in targets if t in thresholds])


def cross_fitted(
    probabilities: Sequence[Sequence[float]],
    truth: Sequence[str],
    labels: Sequence[str],
    targets: dict[str, float],
    seed: int,
) -> list[str]:
    """Each row's decision by a rule fitted on the other half of the rows."""
    rng = random.Random(seed)
    fold = [0] * len(truth)
    for label in set(truth):
        rows = [i for i, t in enumerate(truth) if t == label]
        rng.shuffle(rows)
        for position, row in enumerate(rows):
            fold[row] = position % 2
    decided = [""] * len(truth)
    for held in (0, 1):
        fitting = [i for i in range(len(truth)) if fold[i] != held]
        rule = fit(
            [probabilities[i] for i in fitting], [truth[i] for i in fitting], labels, targets
        )
        for i in range(len(truth)):
            if fold[i] == held:
                decided[i] = labels[rule.decide(probabilities[i], labels)]
    return decided


def evaluate(
    probabilities: Sequence[Sequence[float]],
    truth: Sequence[str],
    labels: list[str],
    targets: dict[str, float],
    seed: int,
) -> dict[str, Any]:
    """What the report says of the rule: the targets, the stored thresholds, and the
    cross-fitted metrics (accuracy, macro-F1, per-class precision and recall)."""
    from sectune.evaluation.metrics import classification_metrics

    decided = cross_fitted(probabilities, truth, labels, targets, seed)
    metrics = classification_metrics(list(truth), decided, labels)
    rule = fit(probabilities, truth, labels, targets)
    return {
        "recallTargets": targets,
        "rule": rule.model_dump(),
        "crossFitted": {k: metrics[k] for k in ("examples", "accuracy", "macroF1", "perClass")},
    }
