"""`sectune evaluate --endpoint`: measure a deployed adapter through its server's API.

The server says which version answers, its digest and the job config it was trained with, so
the data is read, validated and sanitized exactly as at training time, and each prompt is built
by the server from the same template. The report puts the served numbers next to the ones
recorded at training time: serving/training consistency, per metric.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sectune.config import Gate, JobSpec
from sectune.contract import DataReport, RunReport
from sectune.data.example import Example
from sectune.data.format import messages_for
from sectune.evaluation.metrics import (
    classification_metrics,
    extraction_metrics,
    generation_metrics,
    latency_summary,
)
from sectune.evaluation.probes import injection_probe, load_attacks
from sectune.evaluation.report import HEADLINE

CONCURRENCY = 8
LATENCY_REQUESTS = 20
CONSISTENCY_EXAMPLES = 48
GENERATION_EXAMPLES = 64
# Quality metrics worth comparing between training time and serving (not speed: the hardware
# and the path differ by design).
CONSISTENCY_METRICS = tuple(
    m
    for m in HEADLINE
    if m
    not in (
        "latencyP95Ms",
        "throughputPerSecond",
        "consistency",
        "validationLoss",
        "canaryExposure",
    )
)


class EndpointError(RuntimeError):
    """The server cannot be reached or refused a request; the message says which and why."""


class Client:
    def __init__(self, endpoint: str, api_key: str | None, timeout: float = 300.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.endpoint = endpoint.rstrip("/")
        self._http = httpx.Client(base_url=self.endpoint, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EndpointError(f"{self.endpoint}{path}: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise EndpointError(f"{self.endpoint}{path}: HTTP {response.status_code}: {message}")
        return response.json()

    def close(self) -> None:
        self._http.close()


def served_version(client: Client, model: str) -> dict[str, Any]:
    """The version that `model` ("name" or "name@version") names on the server."""
    name, _, pinned = model.partition("@")
    entry = client.request("GET", f"/v1/models/{name}")
    versions = entry["versions"]
    if pinned:
        for version in versions:
            if version["version"] == pinned:
                return dict(version)
        known = ", ".join(v["version"] for v in versions)
        raise EndpointError(f"{name} has no version {pinned!r} on the server; it serves {known}")
    if len(versions) > 1:
        shares = ", ".join(f"{v['version']} ({v['traffic']}%)" for v in versions)
        raise EndpointError(
            f"{name} serves several versions: {shares}; name one, e.g. --model {name}@{versions[0]['version']}"
        )
    return dict(versions[0])


def _classify(client: Client, model: str, labels: list[str], example: Example) -> list[float]:
    answer = client.request("POST", "/v1/classify", {"model": model, "input": example.fields})
    return [float(answer["probabilities"][label]) for label in labels]


def _generate(client: Client, model: str, spec: JobSpec, example: Example) -> str:
    answer = client.request(
        "POST",
        "/v1/chat/completions",
        {
            "model": model,
            "messages": messages_for(example, spec),
            "max_tokens": 128,
            "temperature": 0,
            # Free decoding, like the stored evaluation's headline figures it is compared
            # with (an extraction adapter's answers are otherwise held to its schema).
            "response_format": {"type": "text"},
        },
    )
    return str(answer["choices"][0]["message"]["content"]).strip()


def _served_classification(
    client: Client, model: str, examples: list[Example], spec: JobSpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    labels = spec.task.labels
    pool = ThreadPoolExecutor(CONCURRENCY)

    def predict_all(batch: list[Example]) -> list[list[float]]:
        return list(pool.map(lambda e: _classify(client, model, labels, e), batch))

    def argmax(rows: list[list[float]]) -> list[str]:
        return [labels[max(range(len(labels)), key=row.__getitem__)] for row in rows]

    began = time.perf_counter()
    probabilities = predict_all(examples)
    throughput = len(examples) / max(time.perf_counter() - began, 1e-9)
    predictions = argmax(probabilities)
    metrics = classification_metrics(
        [e.target for e in examples], predictions, labels, probabilities
    )
    latencies, single = [], []
    for example in examples[: max(LATENCY_REQUESTS, CONSISTENCY_EXAMPLES)]:
        began = time.perf_counter()
        single.append(_classify(client, model, labels, example))
        latencies.append((time.perf_counter() - began) * 1000)
    metrics |= latency_summary(latencies[:LATENCY_REQUESTS]) | {"throughputPerSecond": throughput}
    # Alone versus batched with other requests: the served answer must not depend on the company.
    alone = argmax(single[:CONSISTENCY_EXAMPLES])
    metrics["consistency"] = sum(a == b for a, b in zip(alone, predictions, strict=False)) / max(
        len(alone), 1
    )
    probes: dict[str, Any] = {}
    if spec.evaluation.injection_probes:
        probes["injection"] = injection_probe(
            lambda batch: argmax(predict_all(batch)),
            examples,
            spec,
            load_attacks(),
            limit=spec.evaluation.probe_examples,
        )
        metrics["injectionFlipRate"] = probes["injection"]["injectionFlipRate"]
        metrics["injectionSuccessRate"] = probes["injection"]["injectionSuccessRate"]
    pool.shutdown()
    return metrics, probes


def _served_generation(
    client: Client, model: str, examples: list[Example], spec: JobSpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    sample = examples[:GENERATION_EXAMPLES]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outputs = list(pool.map(lambda e: _generate(client, model, spec, e), sample))
    references = [e.target for e in sample]
    if spec.task.type == "extraction" and spec.task.output_schema is not None:
        metrics = extraction_metrics(outputs, references, spec.task.output_schema)
    else:
        metrics = generation_metrics(outputs, references)
    latencies = []
    for example in sample[:5]:
        began = time.perf_counter()
        _generate(client, model, spec, example)
        latencies.append((time.perf_counter() - began) * 1000)
    metrics |= latency_summary(latencies)
    samples = [
        {"output": o, "reference": r} for o, r in zip(outputs[:5], references[:5], strict=False)
    ]
    return metrics, {"samples": samples}


def consistency_table(
    served: dict[str, Any], training: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Per metric measured both ways: training-time value, served value, and their difference."""
    table: dict[str, dict[str, float]] = {}
    for metric in CONSISTENCY_METRICS:
        a, b = training.get(metric), served.get(metric)
        if isinstance(a, int | float) and isinstance(b, int | float):
            table[metric] = {"training": float(a), "served": float(b), "delta": float(b) - float(a)}
    return table


def evaluate_endpoint(
    endpoint: str,
    model: str,
    data_uri: str,
    gates_path: str | None,
    api_key: str | None = None,
) -> RunReport:
    """Evaluate `model` on a running server against its gates (or `gates_path`)."""
    from pathlib import Path

    from pydantic import TypeAdapter

    from sectune.evaluation.gates import BASELINES_FROM, evaluate_gates, gate_verdict
    from sectune.evaluation.suite import load_labelled
    from sectune.yamlio import load_yaml

    client = Client(endpoint, api_key)
    try:
        version = served_version(client, model)
        spec = JobSpec.model_validate(version["config"])
        pinned = f"{model.partition('@')[0]}@{version['version']}"
        examples, sanitized = load_labelled(data_uri, spec)
        if spec.task.type == "classification":
            metrics, probes = _served_classification(client, pinned, examples, spec)
        else:
            metrics, probes = _served_generation(client, pinned, examples, spec)
    finally:
        client.close()
    training = dict(version.get("training", {}).get("metrics", {}))
    gates = spec.evaluation.gates
    if gates_path:
        gates = TypeAdapter(list[Gate]).validate_python(load_yaml(Path(gates_path).read_text()))
    baselines = version.get("training", {}).get("baselines", {})
    outcomes = evaluate_gates(gates, metrics, baselines)
    passed, verdict = gate_verdict(outcomes)
    return RunReport(
        job=version.get("job"),
        endpoint=client.endpoint,
        adapter={"model": pinned, "uri": version.get("uri"), "sha256": version.get("sha256")},
        data=DataReport(uri=data_uri, examples=len(examples), sanitize=sanitized),
        models={"tuned": metrics, "training": training},
        consistency=consistency_table(metrics, training),
        baselines_from=BASELINES_FROM if baselines else None,
        probes=probes,
        gates=outcomes,
        gates_passed=passed,
        verdict=verdict,
    )
