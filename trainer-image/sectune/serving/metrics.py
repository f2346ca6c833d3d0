"""The server's Prometheus metrics, per adapter and version.

Names are what the chart's dashboards and alert rules query; keep them stable.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        version = ["adapter", "version"]
        self.requests = Counter(
            "sectune_serve_requests",
            "Requests answered, by endpoint and HTTP status code; routing is traffic (the "
            "weighted split chose the version) or pinned (the caller named name@version).",
            [*version, "endpoint", "code", "routing"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sectune_serve_request_duration_seconds",
            "Time from request to response (routing as for sectune_serve_requests_total).",
            [*version, "endpoint", "routing"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "sectune_serve_tokens",
            "Tokens processed: kind is prompt or completion.",
            [*version, "kind"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "sectune_serve_predictions",
            "Labels predicted by /v1/classify.",
            [*version, "label"],
            registry=self.registry,
        )
        self.confidence = Histogram(
            "sectune_serve_confidence",
            "Probability of the predicted label.",
            version,
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.drift = Gauge(
            "sectune_serve_drift_score",
            "Jensen-Shannon divergence (bits, 0..1) of predicted labels over the drift window "
            "against the evaluation-time distribution.",
            version,
            registry=self.registry,
        )
        self.input_drift = Gauge(
            "sectune_serve_input_drift_score",
            "Jensen-Shannon divergence (bits, 0..1) of prompt lengths over the drift window "
            "against the held-out data the adapter was evaluated on (every task type).",
            version,
            registry=self.registry,
        )
        self.drift_threshold = Gauge(
            "sectune_serve_drift_threshold",
            "The deployment's drift threshold per adapter version (spec.drift.threshold), so "
            "one alert rule compares every score with its own bound.",
            version,
            registry=self.registry,
        )
        self.adapter_refused = Gauge(
            "sectune_serve_adapter_refused",
            "Configured adapter versions this server refused on its last config apply "
            "(value 1), by reason: integrity, base-model, storage, invalid, unsafe-format, "
            "gates-failed.",
            [*version, "reason"],
            registry=self.registry,
        )
        self.adapter_info = Gauge(
            "sectune_serve_adapter_info",
            "Adapter versions loaded and verified (value 1), with their manifest digest and "
            "traffic share.",
            [*version, "sha256", "traffic"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "sectune_serve_adapter_load_failures",
            "Adapter versions that could not be loaded (reason: integrity, base-model, storage, "
            "invalid, unsafe-format, gates-failed).",
            [*version, "reason"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "sectune_serve_verdicts",
            "Analysts' verdicts on /v1/classify answers (POST /v1/feedback), by the label "
            "predicted and the label the analyst gave; correct is true when they agree. Every "
            "pair starts at 0 when a version loads with a feedback store configured.",
            [*version, "predicted", "actual", "correct"],
            registry=self.registry,
        )
        self.generation_verdicts = Counter(
            "sectune_serve_generation_verdicts",
            "Analysts' verdicts on generated answers: verdict is accepted or rejected.",
            [*version, "verdict"],
            registry=self.registry,
        )
        self.shadow_answers = Counter(
            "sectune_serve_shadow_answers",
            "Answers a shadow version gave in the background (never returned), by whether "
            "they agree with the answer the client got.",
            [*version, "agree"],
            registry=self.registry,
        )
        self.feedback_writes = Counter(
            "sectune_serve_feedback_writes",
            "Verdicts written to the feedback store (result stored) or not (failed: the "
            "client was answered 503 and may retry).",
            ["result"],
            registry=self.registry,
        )
        self.offline_macro_f1 = Gauge(
            "sectune_serve_offline_macro_f1",
            "Macro-F1 of the version on its held-out data, from its evaluation report: what "
            "live macro-F1 is compared with.",
            version,
            registry=self.registry,
        )
        self.feedback_min_verdicts = Gauge(
            "sectune_serve_feedback_min_verdicts",
            "The deployment's feedback.minVerdicts per version: fewer verdicts in the window "
            "and live quality is not judged.",
            version,
            registry=self.registry,
        )
        self.feedback_max_drop = Gauge(
            "sectune_serve_feedback_max_drop",
            "The deployment's feedback.maxDrop per version: how far live macro-F1 may fall "
            "below the offline one.",
            version,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "sectune_serve_batch_size",
            "Requests per forward pass (mixed adapters share a batch).",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.reloads = Counter(
            "sectune_serve_config_reloads",
            "Serving config reloads, by result (applied, partial, invalid).",
            ["result"],
            registry=self.registry,
        )
