"""The evaluation a job (or `sectune evaluate`) runs: the same measurements for the base model,
the baselines and the tuned model, so the report compares like with like."""

from __future__ import annotations

from typing import Any

from sectune.config import JobSpec
from sectune.data.prepare import Example, PreparedData
from sectune.evaluation.metrics import classification_metrics, latency_summary
from sectune.evaluation.probes import (
    injection_probe,
    load_attacks,
    memorization_probe,
    regurgitation_probe,
)
from sectune.evaluation.scoring import (
    consistency,
    score_labels,
    validation_loss,
    with_demonstrations,
)

CONSISTENCY_EXAMPLES = 48
LATENCY_REQUESTS = 20


def classify(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    autocast: bool,
    latency: int = 0,
) -> dict[str, Any]:
    """Classification metrics of one model on `examples` (plus latency and throughput)."""
    labels = spec.task.labels
    scores = score_labels(
        model, tokenizer, examples, spec, autocast=autocast, measure_latency=latency
    )
    metrics = classification_metrics(
        [e.target for e in examples], scores.predictions(labels), labels, scores.probabilities
    )
    if latency:
        metrics |= latency_summary(scores.latencies_ms) | {"throughputPerSecond": scores.throughput}
    return metrics


def baselines(
    model: Any, tokenizer: Any, data: PreparedData, spec: JobSpec, autocast: bool
) -> dict[str, dict[str, Any]]:
    """The base model before training: zero-shot with the job's prompt, and (classification)
    with k retrieved training examples in the prompt."""
    if spec.task.type != "classification":
        return {"base": {"validationLoss": validation_loss(model, tokenizer, data.test, spec)}}
    return {
        "base": classify(model, tokenizer, data.test, spec, autocast),
        "fewShot": classify(
            model, tokenizer, with_demonstrations(data.test, data.train), spec, autocast
        ),
    }


def evaluate_tuned(
    model: Any, tokenizer: Any, data: PreparedData, spec: JobSpec, autocast: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the tuned model and the probe results (injection, memorization)."""
    probes: dict[str, Any] = {}
    if spec.task.type != "classification":
        metrics: dict[str, Any] = {
            "validationLoss": validation_loss(model, tokenizer, data.test, spec)
        }
    else:
        metrics = classify(model, tokenizer, data.test, spec, autocast, latency=LATENCY_REQUESTS)
        metrics["consistency"] = consistency(
            model, tokenizer, data.test[:CONSISTENCY_EXAMPLES], spec, autocast
        )
        if spec.evaluation.injection_probes:
            labels = spec.task.labels

            def predict(examples: list[Example]) -> list[str]:
                return score_labels(
                    model, tokenizer, examples, spec, autocast=autocast
                ).predictions(labels)

            probes["injection"] = injection_probe(predict, data.test, spec, load_attacks())
            metrics["injectionFlipRate"] = probes["injection"]["injectionFlipRate"]
            metrics["injectionSuccessRate"] = probes["injection"]["injectionSuccessRate"]
    if spec.evaluation.memorization_probes and data.canaries:
        memorization = memorization_probe(
            model, tokenizer, data.canaries, spec.hyperparameters.seed
        )
        prefixes = [c.rsplit(" ", 1)[0] for c in data.canaries]
        memorization["regurgitation"] = regurgitation_probe(
            model, tokenizer, prefixes, data.canaries
        )
        probes["memorization"] = memorization
        metrics["canaryExposure"] = memorization["canaryExposure"]
    return metrics, probes
