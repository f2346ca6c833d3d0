"""Live training metrics for Prometheus (the operator reads them into status.progress)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server


class TrainingMetrics:
    """sectune_train_* gauges on their own registry, served on `port`."""

    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        gauge = lambda name, doc: Gauge(f"sectune_train_{name}", doc, registry=self.registry)  # noqa: E731
        self.step = gauge("step", "Optimizer steps done")
        self.total_steps = gauge("total_steps", "Optimizer steps planned")
        self.loss = gauge("loss", "Training loss of the last step")
        self.learning_rate = gauge("learning_rate", "Learning rate of the last step")
        self.tokens_per_second = gauge("tokens_per_second", "Training throughput since start")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds to the end of training")
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    def update(self, report: dict[str, Any]) -> None:
        self.step.set(report["step"])
        self.total_steps.set(report["total_steps"])
        self.loss.set(report["loss"])
        self.learning_rate.set(report["learning_rate"])
        self.tokens_per_second.set(report["tokens_per_second"])
        self.eta_seconds.set(report["eta_seconds"])

    def stop(self) -> None:
        self.server.shutdown()
