# mypy: disable-error-code="arg-type"
# (kopf types its callbacks as protocols listing every keyword it passes; handlers here name
# only the keywords they use, which is how kopf documents them.)
"""kopf handlers for AdapterDeployment: resolve sources, render, apply, observe, analyse.

`_converge` is one idempotent pass of six steps, each a function of what the ones before found:
resolve every version's source, render the adapter set (builders), apply the children, observe
what the replicas serve, analyse the canaries, and set the conditions; it returns the typed
status. The create/update/resume handler runs a pass at once, a timer every few seconds (a
FineTuneJob finishing, replicas reporting a hot swap, canary figures in Prometheus). A canary
past its bound is recorded as rolled back and the next pass renders without it. What the
operator rendered last (revision, history, rollbacks) is kept per object in memory and seeded
from status after a restart, so the handler and the timer never count one revision twice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune.config import API_GROUP, API_VERSION, format_validation_error
from sectune.serving import traffic
from sectune.serving.config import ServingConfig
from sectune.yamlio import load_yaml
from sectune_operator import canary, kube, metrics, scrape, serving_status
from sectune_operator.api import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    AdapterSource,
    Condition,
    Revision,
    RollbackSpec,
    RolledBack,
)
from sectune_operator.builders.adapterdeployment import (
    CONFIG_HASH_ANNOTATION,
    CONFIG_KEY,
    SERVING_LABEL,
    SPEC_HASH_ANNOTATION,
    Rendered,
    Resolved,
    build_configmap,
    build_deployment,
    build_network_policy,
    build_pdb,
    build_service,
    child_name,
    config_sha256,
    describe,
    endpoint,
    metrics_port,
    render_serving_config,
)
from sectune_operator.settings import Settings
from sectune_operator.status import (
    dump,
    read_conditions,
    same_conditions,
    set_condition,
    utc_now,
)

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, "adapterdeployments"
HISTORY = 10


# --------------------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, "finetunejobs")
def job_results(namespace: str, name: str, status: kopf.Status, **_: Any) -> dict[Any, Any]:
    """What an AdapterDeployment needs of a FineTuneJob: phase, stored adapter, gates."""
    return {
        (namespace, name): {
            "phase": status.get("phase"),
            "adapter": dict(status.get("adapter") or {}),
            "gates": [dict(g) for g in status.get("gates") or []],
        }
    }


@kopf.index("apps", "v1", "deployments", labels={SERVING_LABEL: kopf.PRESENT})
def serving_deployments(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    status = body.get("status") or {}
    return {
        (namespace, labels[SERVING_LABEL]): {
            "rendered": (body["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
            "readyReplicas": status.get("readyReplicas") or 0,
        }
    }


@kopf.index("", "v1", "configmaps", labels={SERVING_LABEL: kopf.PRESENT})
def serving_configs(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {
        (namespace, labels[SERVING_LABEL]): {
            "sha256": (body["metadata"].get("annotations") or {}).get(CONFIG_HASH_ANNOTATION),
            "data": (body.get("data") or {}).get(CONFIG_KEY, ""),
        }
    }


@kopf.index("", "v1", "pods", labels={SERVING_LABEL: kopf.PRESENT})
def serving_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Any, Any]:
    status = body.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return {
        (namespace, labels[SERVING_LABEL]): {
            "name": body["metadata"]["name"],
            "ready": ready and not body["metadata"].get("deletionTimestamp"),
            "status": {"podIP": status.get("podIP")},
        }
    }


# --------------------------------------------------------------------------- resolving


def _gate_failures(job: dict[str, Any]) -> str:
    failed = [g for g in job.get("gates") or [] if not g.get("passed")]
    return ", ".join(
        f"{g['name']} measured {g['value']:.4g}" if g.get("value") is not None else g["name"]
        for g in failed
    )


def resolve(
    source: AdapterSource,
    namespace: str,
    jobs: kopf.Index,
    require_passed_gates: bool,
) -> tuple[Resolved | None, str, str]:
    """Where a version comes from, or (None, reason, why not)."""
    if source.uri is not None:
        assert source.sha256 is not None  # the schema requires it with a uri
        return Resolved(source.uri, source.sha256), "", ""
    job_name = source.fine_tune_job
    job = next(iter(jobs.get((namespace, job_name), [])), None)
    if job is None:
        return None, "JobNotFound", f"FineTuneJob {job_name} does not exist in {namespace}"
    adapter = job.get("adapter") or {}
    stored = adapter.get("uri") and adapter.get("sha256")
    gates_failed = any(not g.get("passed") for g in job.get("gates") or [])
    if gates_failed and (require_passed_gates or not stored):
        return (
            None,
            "GatesFailed",
            f"FineTuneJob {job_name} did not pass its gates ({_gate_failures(job)})",
        )
    if job.get("phase") != "Succeeded" and not (gates_failed and stored):
        return (
            None,
            "JobNotSucceeded",
            f"FineTuneJob {job_name} is {job.get('phase') or 'Pending'}; waiting for its adapter",
        )
    if not stored:
        return None, "NoAdapter", f"FineTuneJob {job_name} reports no stored adapter"
    return Resolved(adapter["uri"], adapter["sha256"]), "", ""


# --------------------------------------------------------------------------- applying


def _api_error(action: str, exc: ApiException) -> kopf.TemporaryError:
    metrics.API_RETRIES.labels(action).inc()
    return kopf.TemporaryError(f"{action} failed ({exc.status}: {exc.reason}); retrying", delay=5)


def _require_owned(kind: str, metadata: Any, body: kopf.Body) -> None:
    """An existing child is updated only when this AdapterDeployment controls it: a ConfigMap
    or Deployment that merely has the expected name (made by hand, or by someone else) is
    never taken over."""
    uid = body["metadata"]["uid"]
    if any(ref.uid == uid and ref.controller for ref in metadata.owner_references or []):
        return
    message = (
        f"{kind} {metadata.name} already exists and is not owned by this AdapterDeployment; "
        "it is left alone. Delete or rename it, and the servers are rendered on the next pass"
    )
    kopf.warn(body, reason="ChildNotOwned", message=message)
    raise kopf.TemporaryError(message, delay=60)


def _apply_children(
    name: str,
    namespace: str,
    body: kopf.Body,
    config: ServingConfig,
    spec: AdapterDeploymentSpec,
    settings: Settings,
    configs: kopf.Index,
    deployments: kopf.Index,
    logger: Any,
) -> None:
    """Create or update the ConfigMap, Deployment, Service and PodDisruptionBudget; write
    nothing when what exists is already what would be rendered."""
    core, apps, policy = kube.core(), kube.apps(), kube.policy()
    configmap = build_configmap(name, config)
    deployment = build_deployment(name, spec, config, settings)
    existing_config = next(iter(configs.get((namespace, name), [])), None)
    existing_deployment = next(iter(deployments.get((namespace, name), [])), None)
    try:
        if existing_config is None or existing_config["sha256"] != config_sha256(config):
            kopf.adopt(configmap, owner=body)
            try:
                core.create_namespaced_config_map(namespace, configmap)
                logger.info(f"Created ConfigMap {child_name(name)}")
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = core.read_namespaced_config_map(child_name(name), namespace)
                _require_owned("ConfigMap", current.metadata, body)
                core.patch_namespaced_config_map(
                    child_name(name),
                    namespace,
                    {"metadata": configmap["metadata"], "data": configmap["data"]},
                )
                logger.info(f"Updated ConfigMap {child_name(name)}")
        rendered = deployment["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        if existing_deployment is None or existing_deployment["rendered"] != rendered:
            kopf.adopt(deployment, owner=body)
            try:
                apps.create_namespaced_deployment(namespace, deployment)
                logger.info(f"Created Deployment {child_name(name)}")
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = apps.read_namespaced_deployment(child_name(name), namespace)
                _require_owned("Deployment", current.metadata, body)
                deployment["metadata"]["resourceVersion"] = current.metadata.resource_version
                apps.replace_namespaced_deployment(child_name(name), namespace, deployment)
                logger.info(f"Updated Deployment {child_name(name)}")
            children = [build_service(name), build_pdb(name)]
            if spec.feedback.store is not None:
                children.append(build_service(name, peers=True))
            if settings.network_policies:
                children.append(build_network_policy(name, spec, settings))
            for child in children:
                if child["kind"] == "PodDisruptionBudget" and spec.replicas <= 1:
                    try:
                        policy.delete_namespaced_pod_disruption_budget(child_name(name), namespace)
                    except ApiException as exc:
                        if exc.status != 404:
                            raise
                    continue
                kopf.adopt(child, owner=body)
                create = {
                    "Service": core.create_namespaced_service,
                    "PodDisruptionBudget": policy.create_namespaced_pod_disruption_budget,
                    "NetworkPolicy": kube.networking().create_namespaced_network_policy,
                }[child["kind"]]
                try:
                    create(namespace, child)
                    logger.info(f"Created {child['kind']} {child['metadata']['name']}")
                except ApiException as exc:
                    if exc.status != 409:
                        raise
    except ApiException as exc:
        if exc.status >= 500 or exc.status in (409, 429):
            raise _api_error("apply-serving", exc) from None
        raise


# --------------------------------------------------------------------------- converging


@dataclass
class _Memory:
    """What the operator rendered last for one AdapterDeployment, and the rollbacks it holds."""

    revision: int = 0
    generation: int = 0
    history: list[Revision] = field(default_factory=list)
    rolled_back: list[RolledBack] = field(default_factory=list)
    refusal_message: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def seeded(cls, status: AdapterDeploymentStatus) -> _Memory:
        return cls(
            revision=status.revision or 0,
            generation=status.observed_generation or 0,
            history=list(status.history),
            rolled_back=list(status.rolled_back),
        )

    def out_of_traffic(self) -> set[tuple[str, str]]:
        return {(r.adapter, r.version) for r in self.rolled_back}


def _memory(memo: kopf.Memo, key: tuple[str, str], status: AdapterDeploymentStatus) -> _Memory:
    with memo.serving_lock:
        if key not in memo.serving:
            memo.serving[key] = _Memory.seeded(status)
        memory: _Memory = memo.serving[key]
        return memory


def _read_status(status: kopf.Status) -> AdapterDeploymentStatus:
    """The status as last written (fields it does not know ignored); one that does not parse
    (edited by hand) starts anew from its conditions."""
    known = {f.alias or n for n, f in AdapterDeploymentStatus.model_fields.items()}
    try:
        return AdapterDeploymentStatus.model_validate(
            {k: v for k, v in status.items() if k in known}
        )
    except ValidationError:
        return AdapterDeploymentStatus(conditions=read_conditions(status))


def _previous_config(configs: kopf.Index, key: tuple[str, str]) -> ServingConfig | None:
    existing = next(iter(configs.get(key, [])), None)
    if not existing or not existing["data"]:
        return None
    try:
        return ServingConfig.model_validate(load_yaml(existing["data"]))
    except Exception:  # an edited or foreign ConfigMap: render from scratch
        return None


# Each pass of `_converge` is these steps in order, each a function of what the ones before it
# found: resolve -> render -> apply -> observe -> analyse -> conditions.


@dataclass
class _Resolution:
    """Step 1: where each version's files are, and the versions that cannot be rendered."""

    resolved: dict[tuple[str, str], Resolved] = field(default_factory=dict)
    refused: list[tuple[str, str]] = field(default_factory=list)
    """(reason, "<adapter>@<version>: why") of each version left out."""


def _resolve_all(spec: AdapterDeploymentSpec, namespace: str, jobs: kopf.Index) -> _Resolution:
    resolution = _Resolution()
    for adapter in spec.adapters:
        for v in adapter.versions:
            found, reason, why = resolve(
                v.source, namespace, jobs, spec.promotion.require_passed_gates
            )
            if found is None:
                resolution.refused.append((reason, f"{adapter.name}@{v.version}: {why}"))
            else:
                resolution.resolved[(adapter.name, v.version)] = found
    return resolution


def _record_revision(
    memory: _Memory,
    config: ServingConfig,
    generation: int,
    namespace: str,
    body: kopf.Body,
    logger: Any,
) -> None:
    """Step 3 (after applying): count a new revision when the rendered set changed, with why,
    in history, an Event and the metric."""
    digest = config_sha256(config)
    if memory.history and memory.history[-1].config_sha256 == digest:
        return
    memory.revision += 1
    if memory.generation != generation:
        why = f"spec generation {generation}"
    elif memory.rolled_back:
        why = "canary rolled back"
    else:
        why = "a source changed (a FineTuneJob finished or its gates were judged)"
    memory.generation = generation
    entry = Revision(
        revision=memory.revision,
        adapters=describe(config)[:4096],
        config_sha256=digest,
        time=utc_now(),
        reason=why,
    )
    memory.history = [*memory.history, entry][-HISTORY:]
    message = f"Rendered revision {memory.revision}: {entry.adapters}"[:1000]
    logger.info(message)
    kopf.info(body, reason="Rendered", message=message)
    metrics.SERVING_REVISIONS.labels(namespace).inc()


@dataclass
class _Observation:
    """Step 4: what the Deployment and the ready replicas report."""

    ready: int
    """Ready replicas, as the Deployment counts them."""
    ready_pods: list[str]
    replicas: serving_status.Observed


def _observe(
    key: tuple[str, str],
    spec: AdapterDeploymentSpec,
    config: ServingConfig | None,
    indexes: dict[str, kopf.Index],
    settings: Settings,
) -> _Observation:
    deployment = next(iter(indexes["deployments"].get(key, [])), None)
    ready = int(deployment["readyReplicas"]) if deployment else 0
    pods = [p for p in indexes["pods"].get(key, []) if p["ready"]]
    reports = []
    for pod in pods:
        ip = scrape.pod_ip(pod)
        if not ip:
            continue
        port = metrics_port(spec)
        url = settings.serving_metrics_url_template.format(ip=ip, port=port, pod=pod["name"])
        text = scrape.fetch_text(url)
        if text is not None:
            reports.append(serving_status.parse_report(pod["name"], text))
    ready_pods = sorted(p["name"] for p in pods)
    return _Observation(ready, ready_pods, serving_status.observe(config, reports, ready_pods))


@dataclass
class _Verdict:
    """Step 5: the CanaryAnalysis condition."""

    status: str
    reason: str
    message: str


def _analyse(
    name: str,
    namespace: str,
    spec: AdapterDeploymentSpec,
    config: ServingConfig,
    memory: _Memory,
    generation: int,
    settings: Settings,
    body: kopf.Body,
) -> _Verdict:
    """Judge every canary in traffic. A canary past a bound is recorded in `memory` as rolled
    back; the next pass renders its adapter without it."""
    rollback = spec.promotion.rollback
    out = memory.out_of_traffic()
    stable = {a.name: traffic.stable(a.versions).version for a in spec.adapters}
    canaries = [
        (a.name, v.version)
        for a in config.adapters
        for v in a.versions
        if v.traffic > 0 and v.version != stable.get(a.name) and (a.name, v.version) not in out
    ]
    if not canaries:
        return _Verdict("False", "NoCanary", "no canary version in traffic")
    if not settings.prometheus_url:
        return _Verdict(
            "False",
            "PrometheusNotConfigured",
            "canary analysis is off: the operator has no Prometheus URL (chart value "
            "canaryAnalysis.prometheusUrl)",
        )
    selector = settings.prometheus_selector.format(namespace=namespace, deployment=child_name(name))
    quiet: list[str] = []
    judged: list[str] = []
    for adapter, version in canaries:
        try:
            figures = canary.measure(
                settings.prometheus_url, selector, adapter, version, rollback.window_minutes
            )
        except canary.PrometheusError as exc:
            return _Verdict("Unknown", "PrometheusError", str(exc)[:1000])
        if figures.requests < rollback.min_requests:
            quiet.append(f"{adapter}@{version} ({figures.requests:.0f} requests)")
            continue
        breach = canary.judge(figures, rollback)
        window = rollback.window_minutes
        if breach is None:
            try:
                breach, found = _outcomes(
                    settings, selector, adapter, stable[adapter], version, rollback
                )
            except canary.PrometheusError as exc:
                return _Verdict("Unknown", "PrometheusError", str(exc)[:1000])
            if found:
                judged.append(f"{adapter}@{version}: {found}")
            window = rollback.outcome_window_minutes
        if breach is None:
            continue
        memory.rolled_back.append(
            RolledBack(
                adapter=adapter,
                version=version,
                metric=breach.metric,
                value=round(breach.value, 6),
                threshold=breach.threshold,
                generation=generation,
                time=utc_now(),
            )
        )
        message = (
            f"Rolled back {adapter}@{version}: {breach.describe()} over "
            f"{window}m; all of {adapter}'s traffic goes to "
            f"{stable[adapter]} until the spec changes"
        )
        kopf.warn(body, reason="CanaryRolledBack", message=message)
        metrics.CANARY_ROLLBACKS.labels(namespace, breach.metric).inc()
        return _Verdict("True", "RolledBack", message)
    if quiet:
        return _Verdict(
            "Unknown",
            "TooLittleTraffic",
            f"no verdict yet: fewer than {rollback.min_requests} requests in "
            f"{rollback.window_minutes}m for " + ", ".join(quiet),
        )
    outcomes = f"; verdicts over {rollback.outcome_window_minutes}m: " + "; ".join(judged)
    return _Verdict(
        "True",
        "WithinBounds",
        f"canaries within bounds over {rollback.window_minutes}m" + (outcomes if judged else ""),
    )


def _outcomes(
    settings: Settings,
    selector: str,
    adapter: str,
    stable: str,
    version: str,
    rollback: RollbackSpec,
) -> tuple[canary.Breach | None, str]:
    """The canary against the stable version on analysts' verdicts; nothing to say when
    neither has any (no feedback store)."""
    assert settings.prometheus_url
    window = rollback.outcome_window_minutes
    counts = {
        v: canary.confusion(settings.prometheus_url, selector, adapter, v, window)
        for v in (stable, version)
    }
    if not any(counts.values()):
        return None, ""
    return canary.judge_outcomes(counts[stable], counts[version], rollback)


def _conditions(
    conditions: list[Condition],
    spec: AdapterDeploymentSpec,
    resolution: _Resolution,
    rendered: Rendered,
    observation: _Observation,
    verdict: _Verdict | None,
    memory: _Memory,
    generation: int,
) -> list[Condition]:
    """Step 6: VersionsResolved, CanaryAnalysis, CanaryRolledBack, Progressing, Available and
    Degraded from what the steps before found."""

    def put(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions, type_, status, reason, message, utc_now(), generation
        )

    if resolution.refused:
        put("VersionsResolved", "False", resolution.refused[0][0], memory.refusal_message)
    else:
        put("VersionsResolved", "True", "Resolved", "every version's source is resolved")

    if verdict is not None:
        put("CanaryAnalysis", verdict.status, verdict.reason, verdict.message)
    if memory.rolled_back:
        held = "; ".join(
            f"{r.adapter}@{r.version}: {r.metric} {r.value:.4g} above {r.threshold:g}"
            for r in memory.rolled_back
        )
        since = memory.rolled_back[-1].time
        put(
            "CanaryRolledBack",
            "True",
            "ThresholdExceeded",
            f"{held} (since {since}; cleared by the next spec change)",
        )
    else:
        put("CanaryRolledBack", "False", "NoRollback", "no canary rolled back in this generation")

    replicas, ready = observation.replicas, observation.ready
    if rendered.config is None:
        put("Progressing", "False", "NothingToServe", "no adapter version can be rendered yet")
    elif replicas.converged:
        put(
            "Progressing",
            "False",
            "RevisionServed",
            f"every ready replica serves revision {memory.revision}",
        )
    else:
        serving = len(observation.ready_pods) - len(replicas.lagging)
        waiting = f"; waiting for {', '.join(replicas.lagging[:5])}" if replicas.lagging else ""
        put(
            "Progressing",
            "True",
            "Swapping" if ready else "StartingReplicas",
            f"{serving}/{spec.replicas} replicas serve revision {memory.revision}{waiting}",
        )
    available = ready > 0 and bool(replicas.active)
    put(
        "Available",
        "True" if available else "False",
        "ReplicasServing" if available else "NoReplicaServing",
        f"{ready}/{spec.replicas} replicas ready",
    )
    problems = list(replicas.refusals)
    if ready < spec.replicas:
        problems.append(f"{ready}/{spec.replicas} replicas ready")
    if replicas.refusals:
        reason = "ReplicaRefusedVersion"
    else:
        reason = "ReplicasUnavailable" if problems else "AsDesired"
    put(
        "Degraded",
        "True" if problems else "False",
        reason,
        "; ".join(problems)[:4000] or "every replica serves what was rendered",
    )
    return conditions


def _report_refusals(
    resolution: _Resolution, rendered: Rendered, memory: _Memory, body: kopf.Body
) -> None:
    """A Warning for the versions the operator does not render, when what it says changed."""
    if not resolution.refused:
        memory.refusal_message = ""
        return
    message = "; ".join(why for _, why in resolution.refused)
    if rendered.kept_previous:
        message += "; still serving the previous versions of " + ", ".join(rendered.kept_previous)
    if message != memory.refusal_message:
        kopf.warn(body, reason=resolution.refused[0][0], message=message[:1000])
    memory.refusal_message = message


def _converge(
    name: str,
    namespace: str,
    spec: AdapterDeploymentSpec,
    status: kopf.Status,
    generation: int,
    body: kopf.Body,
    memo: kopf.Memo,
    indexes: dict[str, kopf.Index],
    logger: Any,
    analyse: bool,
) -> AdapterDeploymentStatus:
    """One pass: resolve, render, apply, observe, analyse; the status it implies."""
    settings: Settings = memo.settings
    key = (namespace, name)
    current = _read_status(status)
    memory = _memory(memo, key, current)
    with memory.lock:
        # A rollback holds for the generation it was made in: a spec change clears it.
        memory.rolled_back = [r for r in memory.rolled_back if r.generation == generation]
        resolution = _resolve_all(spec, namespace, indexes["jobs"])
        rendered = render_serving_config(
            spec,
            resolution.resolved,
            memory.out_of_traffic(),
            _previous_config(indexes["configs"], key),
        )
        config = rendered.config
        if config is not None:
            _apply_children(
                name, namespace, body, config, spec, settings, indexes["configs"],
                indexes["deployments"], logger,
            )  # fmt: skip
            _record_revision(memory, config, generation, namespace, body, logger)
        _report_refusals(resolution, rendered, memory, body)
        observation = _observe(key, spec, config, indexes, settings)
        verdict = None
        if analyse and config is not None and observation.replicas.converged:
            verdict = _analyse(name, namespace, spec, config, memory, generation, settings, body)
        conditions = _conditions(
            current.conditions, spec, resolution, rendered, observation, verdict, memory,
            generation,
        )  # fmt: skip
        ready, replicas = observation.ready, observation.replicas
        degraded = bool(replicas.refusals or ready < spec.replicas or resolution.refused)
        return AdapterDeploymentStatus(
            phase=serving_status.phase(
                config is not None,
                spec.replicas,
                ready,
                replicas,
                degraded or bool(memory.rolled_back),
            ),
            observed_generation=generation,
            conditions=conditions,
            ready_replicas=ready,
            ready=f"{ready}/{spec.replicas}",
            adapter_count=len(config.adapters) if config else 0,
            active_adapters=serving_status.active_adapters(
                replicas.active, config, replicas.shadow_agreement
            ),
            revision=memory.revision,
            history=memory.history,
            rolled_back=memory.rolled_back,
            endpoint=endpoint(name, namespace),
        )


def _local_uris(spec: AdapterDeploymentSpec) -> list[str]:
    """Fields holding file:// URIs (they would point into the server pod's own filesystem)."""
    fields = {"spec.baseModel.uri": spec.base_model.uri}
    for a in spec.adapters:
        for v in a.versions:
            fields[f"spec.adapters[{a.name}].versions[{v.version}].source.uri"] = v.source.uri or ""
    fields["spec.feedback.store"] = spec.feedback.store or ""
    return [field for field, uri in fields.items() if uri.startswith("file://")]


def _write_status(
    patch: kopf.Patch, body: kopf.Body, status: kopf.Status, new: AdapterDeploymentStatus
) -> None:
    """Patch status when what it says changed (condition transition times aside)."""
    old, written = dict(status), dump(new)
    fields = {k: v for k, v in written.items() if k != "conditions"}
    if all(old.get(k) == v for k, v in fields.items()) and same_conditions(old, new.conditions):
        return
    patch.status.update(written)
    if new.phase != old.get("phase"):
        kopf.info(body, reason=str(new.phase), message=f"AdapterDeployment is {new.phase}")


def _indexes(**kwargs: Any) -> dict[str, kopf.Index]:
    return {
        "jobs": kwargs["job_results"],
        "configs": kwargs["serving_configs"],
        "deployments": kwargs["serving_deployments"],
        "pods": kwargs["serving_pods"],
    }


@kopf.on.create(GROUP, VERSION, PLURAL, retries=10, backoff=5)
@kopf.on.resume(GROUP, VERSION, PLURAL, retries=10, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", retries=10, backoff=5)
def reconcile(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: Any,
    **kwargs: Any,
) -> None:
    """Validate the spec, render and apply the servers' children, write status."""
    generation = int(meta.get("generation") or 0)
    started = time.monotonic()
    settings: Settings = memo.settings
    try:
        parsed = AdapterDeploymentSpec.model_validate(dict(spec))
        reason, message = "", ""
        local = _local_uris(parsed) if not settings.allow_file_uris else []
        if local:
            reason = "LocalURINotAllowed"
            message = (
                f"{', '.join(local)}: file:// URIs point into the server pod's own filesystem; "
                "use s3:// in a cluster (hf:// for base models)"
            )
    except ValidationError as exc:
        reason = "InvalidSpec"
        message = format_validation_error(exc, f"AdapterDeployment {namespace}/{name}")
    if reason:
        conditions = set_condition(
            read_conditions(status), "Available", "False", reason, message, utc_now(), generation
        )
        failed = AdapterDeploymentStatus(
            phase="Failed", conditions=conditions, observed_generation=generation
        )
        patch.status.update(dump(failed))
        metrics.RECONCILE_ERRORS.labels(reason).inc()
        kopf.warn(body, reason=reason, message=message)
        raise kopf.PermanentError(message)
    new = _converge(
        name, namespace, parsed, status, generation, body, memo, _indexes(**kwargs), logger,
        analyse=False,
    )  # fmt: skip
    _write_status(patch, body, status, new)
    metrics.RECONCILE_DURATION.observe(time.monotonic() - started)


def refresh(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    logger: Any,
    **kwargs: Any,
) -> None:
    """Follow FineTuneJobs, replicas and canary figures; re-render when they change it."""
    try:
        parsed = AdapterDeploymentSpec.model_validate(dict(spec))
    except ValidationError:
        return  # reconcile reported it
    new = _converge(
        name, namespace, parsed, status, int(meta.get("generation") or 0), body, memo,
        _indexes(**kwargs), logger, analyse=True,
    )  # fmt: skip
    _write_status(patch, body, status, new)


def register_timers(interval: float) -> None:
    """The refresh timer (its interval is an operator setting, known only at startup)."""
    kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=interval,
        when=lambda status, **_: status.get("phase") != "Failed",
    )(refresh)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    """Children go by owner references; only the operator's memory of the object is left."""
    with memo.serving_lock:
        memo.serving.pop((namespace, name), None)
