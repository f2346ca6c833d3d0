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

Outcomes, when analysts post verdicts (`POST /v1/feedback`): the canary's live macro-F1 is
compared with the stable version's over `outcomeWindowMinutes`, each from at least
`minVerdicts` verdicts; it is rolled back when it is more than `maxMacroF1Drop` lower and a
bootstrap (verdicts of each version resampled with replacement, seeded) puts the drop above 0
in at least 95 % of resamples: a one-sided test that the canary is really worse, not a small
sample's noise.
"""

from __future__ import annotations

import functools
import json
import math
import random
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

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


def _query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read(RESPONSE_LIMIT))
    except (OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query {prometheus_url}: {exc}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus refused {promql!r}: {body.get('error', body)}")
    return list(body.get("data", {}).get("result") or [])


def scalar(prometheus_url: str, promql: str) -> float | None:
    result = _query(prometheus_url, promql)
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


# --------------------------------------------------------------------------- outcomes

Confusion = Counter[tuple[str, str]]
"""Verdicts per (predicted, actual) label."""

CONFIDENCE = 0.95
MAX_DRAWS = 2_000_000
"""Verdicts drawn in all by one bootstrap (bounds its time: fewer resamples past it)."""


def verdicts_query(selector: str, adapter: str, version: str, window_minutes: int) -> str:
    """PromQL: a version's verdicts per (predicted, actual) over the window; a series new in
    the window counts whole (a restarted pod's counters start again)."""
    series = f'sectune_serve_verdicts_total{{{selector},adapter="{adapter}",version="{version}"}}'
    window = f"{window_minutes}m"
    return (
        f"sum by (predicted, actual) ((({series} unless {series} offset {window}) + 0) "
        f"or increase({series}[{window}]))"
    )


def confusion(
    prometheus_url: str, selector: str, adapter: str, version: str, window_minutes: int
) -> Confusion:
    found: Confusion = Counter()
    for row in _query(prometheus_url, verdicts_query(selector, adapter, version, window_minutes)):
        labels, value = row["metric"], float(row["value"][1])
        count = round(value)
        if count > 0:
            found[(labels["predicted"], labels["actual"])] = count
    return found


def macro_f1(counts: Confusion) -> float:
    """scikit-learn's macro-F1 over the labels predicted or given."""
    labels = {p for p, _ in counts} | {a for _, a in counts}
    if not labels:
        return 0.0
    scores = []
    for label in labels:
        right = counts[(label, label)]
        predicted = sum(n for (p, _), n in counts.items() if p == label)
        actual = sum(n for (_, a), n in counts.items() if a == label)
        scores.append(2 * right / (predicted + actual))
    return sum(scores) / len(scores)


@dataclass(frozen=True)
class OutcomeComparison:
    stable: float
    canary: float
    worse_share: float
    """Share of bootstrap resamples in which the canary's macro-F1 is below the stable's."""

    @property
    def drop(self) -> float:
        return self.stable - self.canary


def compare_outcomes(
    stable: Confusion, canary: Confusion, resamples: int = 1000, seed: int = 0
) -> OutcomeComparison:
    """Both versions' live macro-F1, and how often a bootstrap finds the canary worse. Seeded,
    so the same counts give the same answer: the analysis asks every few seconds while the
    counts change far less often, and an unchanged pair is not resampled again."""
    return _compare(tuple(sorted(stable.items())), tuple(sorted(canary.items())), resamples, seed)


@functools.lru_cache(maxsize=64)
def _compare(
    stable_cells: tuple[tuple[tuple[str, str], int], ...],
    canary_cells: tuple[tuple[tuple[str, str], int], ...],
    resamples: int,
    seed: int,
) -> OutcomeComparison:
    stable, canary = Counter(dict(stable_cells)), Counter(dict(canary_cells))
    rng = random.Random(seed)
    drawn = stable.total() + canary.total()
    resamples = max(100, min(resamples, MAX_DRAWS // max(drawn, 1)))

    def resample(counts: Confusion) -> Confusion:
        cells = list(counts)
        return Counter(rng.choices(cells, weights=[counts[c] for c in cells], k=counts.total()))

    worse = sum(macro_f1(resample(canary)) < macro_f1(resample(stable)) for _ in range(resamples))
    return OutcomeComparison(macro_f1(stable), macro_f1(canary), worse / resamples)


def judge_outcomes(
    stable: Confusion, canary: Confusion, rollback: RollbackSpec
) -> tuple[Breach | None, str]:
    """A breach when the canary is more than maxMacroF1Drop worse on verdicts and the bootstrap
    says so with 95 % confidence; else None and what was found (for the condition)."""
    least = min(stable.total(), canary.total())
    if least < rollback.min_verdicts:
        return None, f"{least} verdicts (of {rollback.min_verdicts} needed)"
    found = compare_outcomes(stable, canary)
    said = (
        f"live macro-F1 {found.canary:.3f} against stable {found.stable:.3f}, worse in "
        f"{found.worse_share:.0%} of resamples"
    )
    if found.drop > rollback.max_macro_f1_drop and found.worse_share >= CONFIDENCE:
        return Breach("liveMacroF1Drop", found.drop, rollback.max_macro_f1_drop), said
    return None, said
