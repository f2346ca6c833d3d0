"""AdapterDeployment status from observed state: what the ready server replicas report on their
/metrics (the versions they actually serve, with digests, and the ones they refused), compared
with the adapter set the operator rendered. Pure functions, unit-tested without a cluster."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from sectune.serving.config import ServingConfig
from sectune_operator.api import ActiveAdapter, ServingPhase

Served = tuple[str, str, str, int]
"""(adapter, version, manifest sha256, traffic) as a replica reports it."""


@dataclass
class Report:
    """What one replica says it serves and what it refused."""

    pod: str
    served: set[Served] = field(default_factory=set)
    refused: dict[tuple[str, str], str] = field(default_factory=dict)
    shadow_answers: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    """Per shadow (adapter, version): answers agreeing with the one given, and all answers."""


def parse_report(pod: str, text: str) -> Report:
    """A replica's report from its Prometheus text (sectune_serve_adapter_info/_refused)."""
    report = Report(pod)
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError):
        return report
    for family in families:
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "sectune_serve_adapter_info" and sample.value == 1:
                try:
                    traffic = int(labels.get("traffic", "0"))
                except ValueError:
                    continue
                report.served.add(
                    (labels["adapter"], labels["version"], labels.get("sha256", ""), traffic)
                )
            elif sample.name == "sectune_serve_adapter_refused" and sample.value == 1:
                report.refused[(labels["adapter"], labels["version"])] = labels.get("reason", "")
            elif sample.name == "sectune_serve_shadow_answers_total":
                key = (labels["adapter"], labels["version"])
                agreed, total = report.shadow_answers.get(key, (0.0, 0.0))
                agrees = sample.value if labels.get("agree") == "true" else 0.0
                report.shadow_answers[key] = (agreed + agrees, total + sample.value)
    return report


def desired(config: ServingConfig) -> set[Served]:
    return {
        (a.name, v.version, v.sha256 or "", v.traffic) for a in config.adapters for v in a.versions
    }


@dataclass
class Observed:
    """The replicas' combined view."""

    active: set[Served]
    """Served by every ready replica that reported."""
    converged: bool
    """Every ready replica reports exactly the rendered set."""
    lagging: list[str]
    """Pods not (yet) serving the rendered set, or not reporting."""
    refusals: list[str]
    """"<pod> refused <adapter>@<version> (<reason>)" for each replica's refusal."""
    shadow_agreement: dict[tuple[str, str], float] = field(default_factory=dict)
    """Per shadow version, the share of its answers (every replica, since it loaded) that
    agree with the answer the client got."""


def observe(config: ServingConfig | None, reports: list[Report], ready_pods: list[str]) -> Observed:
    """Combine replica reports. A pod in `ready_pods` without a report counts as lagging."""
    by_pod = {r.pod: r for r in reports}
    heard = [by_pod[p] for p in ready_pods if p in by_pod]
    active = set.intersection(*(r.served for r in heard)) if heard else set()
    want = desired(config) if config else set()
    lagging = [p for p in ready_pods if p not in by_pod or by_pod[p].served != want]
    refusals = [
        f"{r.pod} refused {adapter}@{version} ({reason})"
        for r in heard
        for (adapter, version), reason in sorted(r.refused.items())
    ]
    counts: dict[tuple[str, str], tuple[float, float]] = {}
    for r in heard:
        for key, (agreed, total) in r.shadow_answers.items():
            before = counts.get(key, (0.0, 0.0))
            counts[key] = (before[0] + agreed, before[1] + total)
    agreement = {key: agreed / total for key, (agreed, total) in counts.items() if total}
    return Observed(active, bool(ready_pods) and not lagging, lagging, refusals, agreement)


def active_adapters(
    active: set[Served],
    config: ServingConfig | None,
    shadow_agreement: dict[tuple[str, str], float] | None = None,
) -> list[ActiveAdapter]:
    """status.activeAdapters: what the replicas serve, with the URI the operator rendered and,
    for a shadow, its fraction and agreement."""
    rendered = {
        (a.name, v.version, v.sha256): v
        for a in (config.adapters if config else [])
        for v in a.versions
    }
    agreement = shadow_agreement or {}
    return [
        ActiveAdapter(
            name=adapter,
            version=version,
            sha256=sha256,
            traffic=traffic,
            uri=entry.uri if (entry := rendered.get((adapter, version, sha256))) else None,
            shadow=entry.shadow if entry and entry.shadow else None,
            shadow_agreement=(
                round(agreement[(adapter, version)], 4) if (adapter, version) in agreement else None
            ),
        )
        for adapter, version, sha256, traffic in sorted(active)
    ]


def phase(
    rendered: bool,
    replicas: int,
    ready: int,
    observed: Observed,
    degraded: bool,
) -> ServingPhase:
    """Pending (nothing to serve yet), Progressing (replicas starting or not yet serving the
    rendered set), Degraded (serving, with refusals, rollbacks or missing replicas), Ready."""
    if not rendered or replicas == 0:
        return "Pending"
    if ready == 0 or not observed.converged:
        return "Progressing"
    if degraded or ready < replicas:
        return "Degraded"
    return "Ready"
