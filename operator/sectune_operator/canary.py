"""Canary analysis, after Flagger: ask Prometheus how a canary version did over a window and
judge it against `spec.promotion.rollback`.

The figures come from the servers' own metrics (sectune.serving.metrics), counting only what
the version itself caused, so no caller can steer a verdict: only requests the weighted split
sent it (`routing="traffic"`; a caller pinning `name@canary` is not counted); error rate is the
share of 500s, the model failing on a request (4xx are the caller's doing, 499 a caller that
left, 503/504 the server's load); p95 latency from `/v1/classify`, whose work per request is
fixed (a generation's time follows the length the caller asked for, so it is not judged);
drift the highest of the label and prompt-length scores seen in the window. Too few requests in
the window gives no verdict rather than a guess.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from dataclasses import dataclass

from sectune_operator.api import RollbackSpec

RESPONSE_LIMIT = 4 << 20

DRIFT_SCORES = {
    "labels": '__name__="sectune_serve_drift_score"',
    "inputs": '__name__="sectune_serve_input_drift_score"',
    "any": '__name__=~"sectune_serve_drift_score|sectune_serve_input_drift_score"',
}
"""Label matchers for the drift scores a trigger or a canary looks at."""


class PrometheusError(RuntimeError):
    """Prometheus could not be asked, or did not answer a query."""


@dataclass(frozen=True)
class Figures:
    """What one version did over the window."""

    requests: float
    error_rate: float | None
    latency_p95_ms: float | None
    drift: float | None


@dataclass(frozen=True)
class Breach:
    """The figure that exceeded its bound."""

    metric: str
    value: float
    threshold: float

    def describe(self) -> str:
        return f"{self.metric} {self.value:.4g} above {self.threshold:g}"


def queries(selector: str, adapter: str, version: str, window_minutes: int) -> dict[str, str]:
    """PromQL for one version's figures; `selector` picks the deployment's servers."""
    series = f'{selector},adapter="{adapter}",version="{version}"'
    routed = f'{series},routing="traffic"'
    window = f"[{window_minutes}m]"
    return {
        "requests": f"sum(increase(sectune_serve_requests_total{{{routed}}}{window}))",
        "errors": f'sum(increase(sectune_serve_requests_total{{{routed},code="500"}}{window}))',
        "latency_p95": (
            "histogram_quantile(0.95, sum by (le) (rate(sectune_serve_request_duration_seconds"
            f'_bucket{{{routed},endpoint="classify"}}{window})))'
        ),
        # one selector over both scores (`a or b` would drop b wherever a exists), their
        # highest at each step, then the highest over the window
        "drift": f"max_over_time((max({{{series},{DRIFT_SCORES['any']}}}))[{window_minutes}m:15s])",
    }


def scalar(prometheus_url: str, promql: str) -> float | None:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read(RESPONSE_LIMIT))
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query {prometheus_url}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {promql!r}: {body.get('error', body)}")
    result = body.get("data", {}).get("result") or []
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


def measure(
    prometheus_url: str, selector: str, adapter: str, version: str, window_minutes: int
) -> Figures:
    """A version's figures from Prometheus' HTTP API."""
    asked = queries(selector, adapter, version, window_minutes)
    values = {name: scalar(prometheus_url, promql) for name, promql in asked.items()}
    requests = values["requests"] or 0.0
    errors = values["errors"] or 0.0
    p95 = values["latency_p95"]
    return Figures(
        requests=requests,
        error_rate=errors / requests if requests else None,
        latency_p95_ms=p95 * 1000 if p95 is not None else None,
        drift=values["drift"],
    )


def judge(figures: Figures, rollback: RollbackSpec) -> Breach | None:
    """The first bound the figures exceed, or None. Call only with enough requests."""
    bounds = (
        ("errorRate", figures.error_rate, rollback.max_error_rate),
        ("latencyP95Ms", figures.latency_p95_ms, float(rollback.max_latency_p95_ms)),
        ("drift", figures.drift, rollback.max_drift),
    )
    for metric, value, threshold in bounds:
        if value is not None and value > threshold:
            return Breach(metric, value, threshold)
    return None
