# mypy: disable-error-code="arg-type"
# (kopf types its callbacks as protocols listing every keyword it passes; handlers here name
# only the keywords they use, which is how kopf documents them.)
"""kopf handlers for AdapterDeployment: resolve sources, render, apply, observe, analyse.

One function, `_converge`, does it all and is idempotent: the create/update/resume handler calls
it at once, a timer calls it every few seconds (a FineTuneJob finishing, replicas reporting a
hot swap, canary figures in Prometheus). What the operator rendered last (revision, history,
rollbacks) is kept per object in memory and seeded from status after a restart, so the handler
and the timer never count one revision twice.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune.config import format_validation_error
from sectune.serving.config import ServingConfig
from sectune.yamlio import load_yaml
from sectune_operator import canary, kube, metrics, scrape, serving_status
from sectune_operator.api import AdapterDeploymentSpec, AdapterSource
from sectune_operator.builders.adapterdeployment import (
    API_PORT,
    CONFIG_HASH_ANNOTATION,
    CONFIG_KEY,
    SERVING_LABEL,
    SPEC_HASH_ANNOTATION,
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
    render_serving_config,
    stable_version,
)
from sectune_operator.settings import Settings
from sectune_operator.status import set_condition, utc_now

GROUP, VERSION, PLURAL = "sectune.io", "v1alpha1", "adapterdeployments"
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
            if settings.network_policies:
                children.append(build_network_policy(name, settings))
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
                    logger.info(f"Created {child['kind']} {child_name(name)}")
                except ApiException as exc:
                    if exc.status != 409:
                        raise
    except ApiException as exc:
        if exc.status >= 500 or exc.status in (409, 429):
            raise _api_error("apply-serving", exc) from None
        raise


# --------------------------------------------------------------------------- converging


class _Memory:
    """What the operator rendered last for one AdapterDeployment."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.lock = threading.RLock()  # re-entered when a rollback re-renders at once
        self.revision = int(status.get("revision") or 0)
        self.history: list[dict[str, Any]] = list(status.get("history") or [])
        self.rolled_back: list[dict[str, Any]] = list(status.get("rolledBack") or [])
        self.refusal_message = ""
        self.generation = int(status.get("observedGeneration") or 0)


def _memory(memo: kopf.Memo, key: tuple[str, str], status: kopf.Status) -> _Memory:
    with memo.serving_lock:
        if key not in memo.serving:
            memo.serving[key] = _Memory(dict(status))
        memory: _Memory = memo.serving[key]
        return memory


def _previous_config(configs: kopf.Index, key: tuple[str, str]) -> ServingConfig | None:
    existing = next(iter(configs.get(key, [])), None)
    if not existing or not existing["data"]:
        return None
    try:
        return ServingConfig.model_validate(load_yaml(existing["data"]))
    except Exception:  # an edited or foreign ConfigMap: render from scratch
        return None


def _reports(
    pods: list[dict[str, Any]], settings: Settings
) -> tuple[list[serving_status.Report], list[str]]:
    """Each ready replica's report, and the names of the ready replicas."""
    ready = [p for p in pods if p["ready"]]
    reports = []
    for pod in ready:
        ip = scrape.pod_ip(pod)
        if not ip:
            continue
        url = settings.serving_metrics_url_template.format(ip=ip, port=API_PORT, pod=pod["name"])
        text = scrape.fetch_text(url)
        if text is not None:
            reports.append(serving_status.parse_report(pod["name"], text))
    return reports, sorted(p["name"] for p in ready)


def _analyse(
    name: str,
    namespace: str,
    spec: AdapterDeploymentSpec,
    config: ServingConfig,
    memory: _Memory,
    generation: int,
    settings: Settings,
    body: kopf.Body,
) -> tuple[str, str, str, bool]:
    """Judge every canary in traffic. Returns the CanaryAnalysis condition (status, reason,
    message) and whether a canary was rolled back now."""
    rollback = spec.promotion.rollback
    out = {(r["adapter"], r["version"]) for r in memory.rolled_back}
    stable = {a.name: stable_version(a) for a in spec.adapters}
    canaries = [
        (a.name, v.version)
        for a in config.adapters
        for v in a.versions
        if v.traffic > 0 and v.version != stable.get(a.name) and (a.name, v.version) not in out
    ]
    if not canaries:
        return "False", "NoCanary", "no canary version in traffic", False
    if not settings.prometheus_url:
        return (
            "False",
            "PrometheusNotConfigured",
            "canary analysis is off: the operator has no Prometheus URL (chart value "
            "canaryAnalysis.prometheusUrl)",
            False,
        )
    selector = settings.prometheus_selector.format(namespace=namespace, deployment=child_name(name))
    quiet = []
    for adapter, version in canaries:
        try:
            figures = canary.measure(
                settings.prometheus_url, selector, adapter, version, rollback.window_minutes
            )
        except canary.PrometheusError as exc:
            return "Unknown", "PrometheusError", str(exc)[:1000], False
        if figures.requests < rollback.min_requests:
            quiet.append(f"{adapter}@{version} ({figures.requests:.0f} requests)")
            continue
        breach = canary.judge(figures, rollback)
        if breach is None:
            continue
        memory.rolled_back.append(
            {
                "adapter": adapter,
                "version": version,
                "metric": breach.metric,
                "value": round(breach.value, 6),
                "threshold": breach.threshold,
                "generation": generation,
                "time": utc_now(),
            }
        )
        message = (
            f"Rolled back {adapter}@{version}: {breach.describe()} over "
            f"{rollback.window_minutes}m; all of {adapter}'s traffic goes to "
            f"{stable[adapter]} until the spec changes"
        )
        kopf.warn(body, reason="CanaryRolledBack", message=message)
        metrics.CANARY_ROLLBACKS.labels(namespace, breach.metric).inc()
        return "True", "RolledBack", message, True
    if quiet:
        return (
            "Unknown",
            "TooLittleTraffic",
            f"no verdict yet: fewer than {rollback.min_requests} requests in "
            f"{rollback.window_minutes}m for " + ", ".join(quiet),
            False,
        )
    return "True", "WithinBounds", f"canaries within bounds over {rollback.window_minutes}m", False


def _converge(
    name: str,
    namespace: str,
    spec_body: dict[str, Any],
    status: kopf.Status,
    generation: int,
    body: kopf.Body,
    memo: kopf.Memo,
    indexes: dict[str, kopf.Index],
    logger: Any,
    analyse: bool,
) -> dict[str, Any]:
    """Render, apply and observe; the status fields to write."""
    settings: Settings = memo.settings
    spec = AdapterDeploymentSpec.model_validate(spec_body)
    key = (namespace, name)
    memory = _memory(memo, key, status)
    with memory.lock:
        # A rollback holds for the generation it was made in: a spec change clears it.
        memory.rolled_back = [r for r in memory.rolled_back if r["generation"] == generation]
        conditions = list(status.get("conditions") or [])
        resolved: dict[tuple[str, str], Resolved] = {}
        refused: list[tuple[str, str]] = []
        for adapter in spec.adapters:
            for v in adapter.versions:
                found, reason, why = resolve(
                    v.source, namespace, indexes["jobs"], spec.promotion.require_passed_gates
                )
                if found is None:
                    refused.append((reason, f"{adapter.name}@{v.version}: {why}"))
                else:
                    resolved[(adapter.name, v.version)] = found
        out = {(r["adapter"], r["version"]) for r in memory.rolled_back}
        rendered = render_serving_config(
            spec, resolved, out, _previous_config(indexes["configs"], key)
        )
        config = rendered.config
        if config is not None:
            _apply_children(
                name,
                namespace,
                body,
                config,
                spec,
                settings,
                indexes["configs"],
                indexes["deployments"],
                logger,
            )
            digest = config_sha256(config)
            if not memory.history or memory.history[-1]["configSha256"] != digest:
                memory.revision += 1
                if memory.generation != generation:
                    why = f"spec generation {generation}"
                elif out:
                    why = "canary rolled back"
                else:
                    why = "a source changed (a FineTuneJob finished or its gates were judged)"
                memory.generation = generation
                entry = {
                    "revision": memory.revision,
                    "adapters": describe(config)[:4096],
                    "configSha256": digest,
                    "time": utc_now(),
                    "reason": why,
                }
                memory.history = [*memory.history, entry][-HISTORY:]
                message = f"Rendered revision {memory.revision}: {entry['adapters']}"[:1000]
                logger.info(message)
                kopf.info(body, reason="Rendered", message=message)
                metrics.SERVING_REVISIONS.labels(namespace).inc()

        # Versions the operator does not render, and why.
        if refused:
            message = "; ".join(why for _, why in refused)
            if rendered.kept_previous:
                message += "; still serving the previous versions of " + ", ".join(
                    rendered.kept_previous
                )
            reason = refused[0][0]
            conditions = set_condition(
                conditions, "VersionsResolved", "False", reason, message, utc_now(), generation
            )
            if message != memory.refusal_message:
                kopf.warn(body, reason=reason, message=message[:1000])
        else:
            message = "every version's source is resolved"
            conditions = set_condition(
                conditions, "VersionsResolved", "True", "Resolved", message, utc_now(), generation
            )
        memory.refusal_message = message if refused else ""

        # What the replicas report.
        deployment = next(iter(indexes["deployments"].get(key, [])), None)
        ready = int(deployment["readyReplicas"]) if deployment else 0
        reports, ready_pods = _reports(list(indexes["pods"].get(key, [])), settings)
        observed = serving_status.observe(config, reports, ready_pods)

        analysis = None
        if analyse and config is not None and observed.converged:
            analysis = _analyse(name, namespace, spec, config, memory, generation, settings, body)
            if analysis[3]:  # rolled back: render the stable-only set at once
                return _converge(
                    name, namespace, spec_body, status, generation, body, memo, indexes, logger,
                    analyse=False,
                )  # fmt: skip
        if analysis is not None:
            conditions = set_condition(
                conditions, "CanaryAnalysis", *analysis[:3], utc_now(), generation
            )
        if memory.rolled_back:
            last = memory.rolled_back[-1]
            conditions = set_condition(
                conditions,
                "CanaryRolledBack",
                "True",
                "ThresholdExceeded",
                "; ".join(
                    f"{r['adapter']}@{r['version']}: {r['metric']} {r['value']:.4g} above "
                    f"{r['threshold']:g}"
                    for r in memory.rolled_back
                )
                + f" (since {last['time']}; cleared by the next spec change)",
                utc_now(),
                generation,
            )
        else:
            conditions = set_condition(
                conditions,
                "CanaryRolledBack",
                "False",
                "NoRollback",
                "no canary rolled back in this generation",
                utc_now(),
                generation,
            )

        revision = memory.revision
        if config is None:
            progress = ("False", "NothingToServe", "no adapter version can be rendered yet")
        elif observed.converged:
            progress = (
                "False",
                "RevisionServed",
                f"every ready replica serves revision {revision}",
            )
        else:
            progress = (
                "True",
                "Swapping" if ready else "StartingReplicas",
                f"{len(ready_pods) - len(observed.lagging)}/{spec.replicas} replicas serve "
                f"revision {revision}"
                + (f"; waiting for {', '.join(observed.lagging[:5])}" if observed.lagging else ""),
            )
        conditions = set_condition(conditions, "Progressing", *progress, utc_now(), generation)
        available = ready > 0 and bool(observed.active)
        conditions = set_condition(
            conditions,
            "Available",
            "True" if available else "False",
            "ReplicasServing" if available else "NoReplicaServing",
            f"{ready}/{spec.replicas} replicas ready",
            utc_now(),
            generation,
        )
        problems = list(observed.refusals)
        if ready < spec.replicas:
            problems.append(f"{ready}/{spec.replicas} replicas ready")
        degraded = bool(problems or refused or memory.rolled_back)
        conditions = set_condition(
            conditions,
            "Degraded",
            "True" if problems else "False",
            "ReplicaRefusedVersion"
            if observed.refusals
            else ("ReplicasUnavailable" if problems else "AsDesired"),
            "; ".join(problems)[:4000] or "every replica serves what was rendered",
            utc_now(),
            generation,
        )
        return {
            "phase": serving_status.phase(
                config is not None, spec.replicas, ready, observed, degraded
            ),
            "observedGeneration": generation,
            "conditions": conditions,
            "readyReplicas": ready,
            "ready": f"{ready}/{spec.replicas}",
            "adapterCount": len(config.adapters) if config else 0,
            "activeAdapters": serving_status.active_adapters(observed.active, config),
            "revision": revision,
            "history": memory.history,
            "rolledBack": memory.rolled_back,
            "endpoint": endpoint(name, namespace),
        }


def _local_uris(spec: AdapterDeploymentSpec) -> list[str]:
    """Fields holding file:// URIs (they would point into the server pod's own filesystem)."""
    fields = {"spec.baseModel.uri": spec.base_model.uri}
    for a in spec.adapters:
        for v in a.versions:
            fields[f"spec.adapters[{a.name}].versions[{v.version}].source.uri"] = v.source.uri or ""
    return [field for field, uri in fields.items() if uri.startswith("file://")]


def _write_status(
    patch: kopf.Patch, body: kopf.Body, status: kopf.Status, new: dict[str, Any]
) -> None:
    old = dict(status)
    comparable = {k: v for k, v in new.items() if k != "conditions"}
    unchanged = all(old.get(k) == v for k, v in comparable.items())
    old_conditions = {
        c["type"]: (c["status"], c["reason"], c["message"]) for c in old.get("conditions") or []
    }
    new_conditions = {
        c["type"]: (c["status"], c["reason"], c["message"]) for c in new["conditions"]
    }
    if unchanged and old_conditions == new_conditions:
        return
    patch.status.update(new)
    if new["phase"] != old.get("phase"):
        kopf.info(body, reason=new["phase"], message=f"AdapterDeployment is {new['phase']}")


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
            status.get("conditions") or [],
            "Available",
            "False",
            reason,
            message,
            utc_now(),
            generation,
        )
        patch.status.update(
            {"phase": "Failed", "conditions": conditions, "observedGeneration": generation}
        )
        metrics.RECONCILE_ERRORS.labels(reason).inc()
        kopf.warn(body, reason=reason, message=message)
        raise kopf.PermanentError(message)
    new = _converge(
        name, namespace, dict(spec), status, generation, body, memo, _indexes(**kwargs), logger,
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
        new = _converge(
            name, namespace, dict(spec), status, int(meta.get("generation") or 0), body, memo,
            _indexes(**kwargs), logger, analyse=True,
        )  # fmt: skip
    except ValidationError:
        return  # reconcile reported it
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
