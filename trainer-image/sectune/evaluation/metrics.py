"""Classification metrics, computed with scikit-learn where it has them."""

from __future__ import annotations

import itertools
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np


def expected_calibration_error(
    confidences: list[float], correct: list[bool], bins: int = 10
) -> float:
    """Weighted gap between confidence and accuracy over equal-width confidence bins."""
    conf, hit = np.asarray(confidences, dtype=float), np.asarray(correct, dtype=float)
    if conf.size == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (conf > low) & (conf <= high) if low > 0 else (conf >= low) & (conf <= high)
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - hit[inside].mean())
    return float(total)


def calibration_bins(
    confidences: list[float], correct: list[bool], bins: int = 10
) -> list[dict[str, float]]:
    conf, hit = np.asarray(confidences, dtype=float), np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for low, high in itertools.pairwise(edges):
        inside = (conf > low) & (conf <= high) if low > 0 else (conf >= low) & (conf <= high)
        if inside.any():
            out.append(
                {
                    "low": float(low),
                    "high": float(high),
                    "confidence": float(conf[inside].mean()),
                    "accuracy": float(hit[inside].mean()),
                    "count": int(inside.sum()),
                }
            )
    return out


def classification_metrics(
    truth: list[str],
    predicted: list[str],
    labels: list[str],
    probabilities: list[list[float]] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted F1, confusion
    matrix, and (with probabilities) one-vs-rest ROC-AUC and expected calibration error."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    result: dict[str, Any] = {
        "examples": len(truth),
        "accuracy": float(accuracy_score(truth, predicted)),
        "macroF1": float(
            f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
        ),
        "weightedF1": float(
            f1_score(truth, predicted, labels=labels, average="weighted", zero_division=0)
        ),
        "perClass": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
        "confusionMatrix": {
            "labels": labels,
            "matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
        },
        "formatCompliance": float(np.mean([p in labels for p in predicted])) if predicted else 0.0,
    }
    if probabilities is not None and len(truth):
        probs = np.asarray(probabilities, dtype=float)
        present = sorted({labels.index(t) for t in truth})
        if len(present) >= 2:
            # Score only classes present in the held-out data (AUC is undefined otherwise).
            y = np.asarray([labels.index(t) for t in truth])
            aucs = [roc_auc_score(y == k, probs[:, k]) for k in present]
            result["rocAuc"] = float(np.mean(aucs))
        confidences = probs.max(axis=1).tolist()
        correct = [t == p for t, p in zip(truth, predicted, strict=True)]
        result["expectedCalibrationError"] = expected_calibration_error(confidences, correct)
        result["calibration"] = calibration_bins(confidences, correct)
    return result


def without_leaked(
    examples: list[Any], predictions: list[str], labels: list[str], leaked: AbstractSet[str]
) -> dict[str, Any]:
    """Accuracy and macro-F1 on the held-out rows that do not nearly duplicate a training row
    (the data audit's leakage), so a reader sees how much the leaked rows flatter them."""
    clean = [i for i, e in enumerate(examples) if e.id not in leaked]
    if not leaked or not clean or len(clean) == len(examples):
        return {}
    without = classification_metrics(
        [examples[i].target for i in clean], [predictions[i] for i in clean], labels
    )
    return {f"{k}WithoutLeaked": without[k] for k in ("accuracy", "macroF1")} | {
        "rowsWithoutLeaked": len(clean)
    }


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    if not latencies_ms:
        return {}
    values = np.asarray(latencies_ms)
    return {
        "latencyP50Ms": float(np.percentile(values, 50)),
        "latencyP95Ms": float(np.percentile(values, 95)),
        "latencyP99Ms": float(np.percentile(values, 99)),
    }


def _tokens(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def overlap_f1(prediction: str, reference: str) -> float:
    """Token-level F1 between a generated text and its reference (SQuAD-style)."""
    from collections import Counter

    predicted, expected = Counter(_tokens(prediction)), Counter(_tokens(reference))
    common = sum((predicted & expected).values())
    if not common:
        return 0.0
    precision, recall = common / sum(predicted.values()), common / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


def extraction_metrics(
    predictions: list[str], references: list[str], schema: dict[str, Any]
) -> dict[str, Any]:
    """For JSON outputs: how many parse (formatCompliance: an object, each name once — a
    repeated name is read differently by different parsers, first or last), how many match the
    schema (schemaCompliance), field-level exact match and micro F1 against the reference
    fields."""
    import json

    import jsonschema

    def unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise json.JSONDecodeError("a name appears twice in one object", "", 0)
        return dict(pairs)

    validator = jsonschema.Draft202012Validator(schema)
    parsed_count = valid_count = 0
    true_positive = predicted_fields = expected_fields = exact = 0
    for prediction, reference in zip(predictions, references, strict=True):
        expected = json.loads(reference)
        expected_fields += len(expected)
        try:
            got = json.loads(prediction, object_pairs_hook=unique_names)
        except json.JSONDecodeError:
            continue
        if not isinstance(got, dict):
            continue
        parsed_count += 1
        valid_count += validator.is_valid(got)
        predicted_fields += len(got)
        matches = sum(1 for k, v in got.items() if k in expected and expected[k] == v)
        true_positive += matches
        exact += got == expected
    n = max(len(predictions), 1)
    precision = true_positive / predicted_fields if predicted_fields else 0.0
    recall = true_positive / expected_fields if expected_fields else 0.0
    return {
        "examples": len(predictions),
        "formatCompliance": parsed_count / n,
        "schemaCompliance": valid_count / n,
        "exactMatch": exact / n,
        "fieldPrecision": precision,
        "fieldRecall": recall,
        "fieldF1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, Any]:
    n = max(len(predictions), 1)
    return {
        "examples": len(predictions),
        "formatCompliance": sum(bool(p.strip()) for p in predictions) / n,
        "referenceOverlapF1": sum(
            overlap_f1(p, r) for p, r in zip(predictions, references, strict=True)
        )
        / n,
    }
