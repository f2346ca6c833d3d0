"""Live training metrics for Prometheus (the operator reads them into status.progress)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from sectune.contract import PROGRESS_PREFIX, TrainingProgress


class TrainingMetrics:
    """A sectune_train_<field> gauge per exported TrainingProgress field, on its own registry,
    served on `port`."""

    def __init__(self, port: int, address: str = "0.0.0.0") -> None:
        self.registry = CollectorRegistry()
        fields = TrainingProgress.model_fields
        self.gauges = {
            name: Gauge(
                f"{PROGRESS_PREFIX}{name}", fields[name].description or name, registry=self.registry
            )
            for name in TrainingProgress.EXPORTED
        }
        self.server, self.thread = start_http_server(port, addr=address, registry=self.registry)

    def update(self, progress: TrainingProgress) -> None:
        for name, gauge in self.gauges.items():
            gauge.set(getattr(progress, name))

    def stop(self) -> None:
        self.server.shutdown()
