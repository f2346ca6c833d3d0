"""The operator's own Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()


class PhaseCounts(Collector):
    """sectune_operator_finetunejobs{namespace, phase}: counted at scrape time by `source`."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[tuple[str, str], int]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "sectune_operator_finetunejobs", "FineTuneJobs by phase", labels=["namespace", "phase"]
        )
        for (namespace, phase), count in sorted(self.source().items()):
            family.add_metric([namespace, phase], count)
        yield family


FINETUNEJOBS = PhaseCounts()
REGISTRY.register(FINETUNEJOBS)
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
EVENTS_DROPPED = Counter(
    "sectune_operator_events_dropped_total",
    "Kubernetes Events not posted because too many were waiting (status was still written)",
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
SCHEDULE_QUERY_ERRORS = Counter(
    "sectune_operator_schedule_query_errors_total",
    "FineTuneSchedule trigger queries (drift, live quality) that Prometheus did not answer",
    ["namespace", "schedule"],
    registry=REGISTRY,
)
SCHEDULE_TRIGGER_VALUE = Gauge(
    "sectune_operator_schedule_trigger_value",
    "What a FineTuneSchedule's triggers last read: kind value (drift, the lowest over its "
    "forMinutes) next to threshold; kind liveMacroF1 (the highest over its forMinutes) next "
    "to minMacroF1",
    ["namespace", "schedule", "kind"],
    registry=REGISTRY,
)
SCHEDULE_LAST_RUN = Gauge(
    "sectune_operator_schedule_last_run_timestamp_seconds",
    "When a FineTuneSchedule last started a run (Unix time), by what started it (cron, drift, "
    "quality)",
    ["namespace", "schedule", "trigger"],
    registry=REGISTRY,
)


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
