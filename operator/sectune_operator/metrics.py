"""The operator's own Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

FINETUNEJOBS = Gauge(
    "sectune_operator_finetunejobs",
    "FineTuneJobs by phase",
    ["namespace", "phase"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "sectune_operator_reconcile_duration_seconds",
    "Time to reconcile a FineTuneJob or AdapterDeployment (create or update)",
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_ERRORS = Counter(
    "sectune_operator_reconcile_errors_total",
    "Reconcile errors by reason",
    ["reason"],
    registry=REGISTRY,
)
TRAINING_DURATION = Histogram(
    "sectune_operator_training_duration_seconds",
    "From Job start to Succeeded or Failed",
    registry=REGISTRY,
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
)
FINETUNEJOB_FAILURES = Counter(
    "sectune_operator_finetunejob_failures_total",
    "FineTuneJobs that ended Failed, by reason (the Failed condition's)",
    ["namespace", "reason"],
    registry=REGISTRY,
)
GATE_FAILURES = Counter(
    "sectune_operator_gate_failures_total",
    "Jobs that ended with failed gates",
    ["namespace"],
    registry=REGISTRY,
)
API_RETRIES = Counter(
    "sectune_operator_api_retries_total",
    "Kubernetes API calls retried after a server error or throttling",
    ["operation"],
    registry=REGISTRY,
)
SERVING_REVISIONS = Counter(
    "sectune_operator_serving_revisions_total",
    "Adapter sets rendered for AdapterDeployment servers",
    ["namespace"],
    registry=REGISTRY,
)
CANARY_ROLLBACKS = Counter(
    "sectune_operator_canary_rollbacks_total",
    "Canary versions rolled back automatically, by the figure that exceeded its bound",
    ["namespace", "metric"],
    registry=REGISTRY,
)

_phase_labels: set[tuple[str, str]] = set()


def set_phase_counts(counts: dict[tuple[str, str], int]) -> None:
    """Set the by-phase gauge; label pairs that disappeared go to zero."""
    for labels in _phase_labels - counts.keys():
        FINETUNEJOBS.labels(*labels).set(0)
    for labels, count in counts.items():
        FINETUNEJOBS.labels(*labels).set(count)
    _phase_labels.update(counts)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
