# mypy: disable-error-code="arg-type"
# (kopf types its callbacks as protocols listing every keyword it passes; handlers here name
# only the keywords they use, which is how kopf documents them.)
"""kopf handlers for FineTuneSchedule: what CronJob is to Job, for FineTuneJobs.

A timer decides, from the schedule's status and the runs it owns (an index of FineTuneJobs
labelled with the schedule), whether a run is due (cron, drift that stayed above its
threshold, or analysts' verdicts that kept live macro-F1 below its bound), applies the concurrency policy, drops finished runs beyond the history limits, and
(opted in) adds a run whose gates passed to an AdapterDeployment as a canary. Runs are named
from their scheduled minute, so a restarted operator never starts one twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune.config import API_GROUP, API_VERSION, format_validation_error
from sectune.serving import traffic
from sectune_operator import canary, kube, metrics, schedule
from sectune_operator.api import Condition, FineTuneScheduleSpec
from sectune_operator.builders.adapterdeployment import child_name as serving_name
from sectune_operator.settings import Settings
from sectune_operator.status import (
    TERMINAL,
    dump_conditions,
    read_conditions,
    same_conditions,
    set_condition,
    utc_now,
)

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, "finetuneschedules"


@kopf.index(GROUP, VERSION, "finetunejobs", labels={schedule.SCHEDULE_LABEL: kopf.PRESENT})
def runs_by_schedule(
    namespace: str, name: str, labels: kopf.Labels, meta: kopf.Meta, status: kopf.Status, **_: Any
) -> dict[Any, Any]:
    """A schedule's runs: FineTuneJobs it controls (owner reference), not any job that carries
    its label — a tenant's own job with that label is never deleted or promoted by it."""
    owner = next(
        (
            ref
            for ref in meta.get("ownerReferences") or []
            if ref.get("kind") == "FineTuneSchedule" and ref.get("controller")
        ),
        None,
    )
    if owner is None or owner.get("name") != labels[schedule.SCHEDULE_LABEL]:
        return {}
    return {
        (namespace, owner["name"]): {
            "ownerUid": owner.get("uid"),
            "name": name,
            "phase": status.get("phase"),
            "created": meta.get("creationTimestamp") or "",
            "adapter": dict(status.get("adapter") or {}),
            "metrics": dict(status.get("metrics") or {}),
            "gatesSummary": status.get("gatesSummary"),
        }
    }


def _custom() -> client.CustomObjectsApi:
    return kube.custom_objects()


def _create_run(
    body: kopf.Body,
    namespace: str,
    owner: str,
    run: str,
    spec: FineTuneScheduleSpec,
    why: str,
    previous: _Previous | None,
) -> bool:
    """Create the run; False when it already exists (a restart, or a retry). Unless the
    template names one, the run's `evaluation.previousVersion` is what it would replace (see
    `_previous`), so each run is compared with what came before it."""
    job_spec = spec.job_template.model_dump(mode="json", by_alias=True, exclude_none=True)
    template = spec.job_template
    annotations = {"sectune.io/triggered-by": why[:1000]}
    injected = (
        template.evaluation.previous_version is None
        and template.method.type in ("lora", "qlora")
        and previous is not None
    )
    if injected:
        assert previous is not None
        job_spec["evaluation"]["previousVersion"] = {
            "uri": previous.uri,
            "sha256": previous.sha256,
        }
        annotations["sectune.io/previous-version"] = previous.what[:1000]
    elif template.evaluation.previous_version is None:
        # Nothing served and nothing succeeded before this run: "no worse than the last one"
        # has nothing to compare with, so those gates are left out of this run, and it says so.
        gates = job_spec["evaluation"].get("gates") or []
        kept = [g for g in gates if g.get("overBaseline") != "previous"]
        if len(kept) < len(gates):
            job_spec["evaluation"]["gates"] = kept
            annotations["sectune.io/previous-gates-skipped"] = (
                "nothing to compare with: the AdapterDeployment serves no verified version of "
                "the adapter and no earlier run of this schedule succeeded; gates with "
                "overBaseline: previous start with the next run"
            )
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {
            "name": run,
            "labels": {schedule.SCHEDULE_LABEL: owner},
            "annotations": annotations,
        },
        "spec": job_spec,
    }
    kopf.adopt(job, owner=body)
    try:
        _custom().create_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", job)
    except ApiException as exc:
        if exc.status == 409:
            return False
        raise kopf.TemporaryError(
            f"creating FineTuneJob {run} failed ({exc.status})", delay=5
        ) from None
    kopf.info(body, reason="RunCreated", message=f"Created FineTuneJob {run}: {why}"[:1000])
    return True


@dataclass(frozen=True)
class _Previous:
    """The adapter version a run is compared with (`overBaseline: previous` gates)."""

    uri: str
    sha256: str
    what: str
    """Where it came from, for the run's annotation."""


def _previous(spec: FineTuneScheduleSpec, namespace: str, status: kopf.Status) -> _Previous | None:
    """What a new run would replace: the stable version (sectune.serving.traffic) of the
    schedule's AdapterDeployment (its `promote` target, else its quality or drift trigger's),
    as its servers verified it (status.activeAdapters); without one, the schedule's last
    successful run. A run triggered by analysts' verdicts is so held to "no worse than
    what they judged", not to an earlier run that may never have served."""
    target = spec.promote or spec.quality_trigger or spec.drift_trigger
    if target is not None:
        try:
            deployment = _custom().get_namespaced_custom_object(
                GROUP, VERSION, namespace, "adapterdeployments", target.adapter_deployment
            )
        except ApiException:
            deployment = {}
        adapters = (deployment.get("spec") or {}).get("adapters") or []
        versions: list[dict[str, Any]] = next(
            (a["versions"] for a in adapters if a.get("name") == target.adapter), []
        )
        stable = traffic.name(traffic.stable(versions)) if versions else None
        served = next(
            (
                a
                for a in (deployment.get("status") or {}).get("activeAdapters") or []
                if (a.get("name"), a.get("version")) == (target.adapter, stable)
                and a.get("uri")
                and a.get("sha256")
            ),
            None,
        )
        if served is not None:
            return _Previous(
                served["uri"],
                served["sha256"],
                f"served by {target.adapter_deployment}: {target.adapter}@{stable}",
            )
    last = status.get("lastSuccessfulJob") or {}
    adapter = last.get("adapter") or {}
    if adapter.get("uri") and adapter.get("sha256"):
        return _Previous(
            adapter["uri"], adapter["sha256"], f"the last successful run: {last.get('name')}"
        )
    return None


def _delete_run(namespace: str, run: str) -> None:
    try:
        _custom().delete_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", run)
    except ApiException as exc:
        if exc.status != 404:
            raise


@dataclass(frozen=True)
class TriggerCheck:
    """What a schedule's trigger found: why it fires (None: it does not), the value read, or
    why Prometheus could not be asked."""

    fires: str | None = None
    value: float | None = None
    error: str | None = None
    reason: str = "QueryFailed"
    """The condition's reason when there is an error."""


@dataclass(frozen=True)
class Watch:
    """One of a schedule's triggers as the timer asks it: the condition and Events it writes,
    the query, and when the answer fires."""

    kind: str
    """drift or quality: the run's name mark and the last-run metric's trigger label."""
    condition: str
    """The condition type (DriftTrigger, QualityTrigger); Events are <Kind>QueryFailed and
    <Kind>Triggered."""
    promql: str
    for_minutes: int
    bound: float
    value_kind: str
    bound_kind: str
    above: bool
    """True: fires when the value is above the bound (drift); False: below (quality)."""
    what: str
    """What the value is, for the messages."""

    def fires(self, value: float | None) -> str | None:
        if value is None or (value <= self.bound if self.above else value >= self.bound):
            return None
        side, extreme = ("above", "lowest") if self.above else ("below", "highest")
        return (
            f"{self.what} stayed {side} {self.bound:g} for {self.for_minutes}m "
            f"({extreme} {value:.3g})"
        )


def watches(spec: FineTuneScheduleSpec, namespace: str, settings: Settings) -> list[Watch]:
    """The triggers a schedule has, as queries."""
    found = []
    if spec.drift_trigger is not None:
        drift = spec.drift_trigger
        selector = settings.prometheus_selector.format(
            namespace=namespace, deployment=serving_name(drift.adapter_deployment)
        )
        found.append(
            Watch(
                "drift", "DriftTrigger",
                schedule.drift_query(selector, drift.adapter, drift.score, drift.for_minutes),
                drift.for_minutes, drift.threshold, "value", "threshold", above=True,
                what=f"drift of {drift.adapter_deployment}/{drift.adapter}",
            )
        )  # fmt: skip
    if spec.quality_trigger is not None:
        quality = spec.quality_trigger
        found.append(
            Watch(
                "quality", "QualityTrigger",
                schedule.quality_query(
                    namespace, quality.adapter, quality.min_verdicts, quality.for_minutes
                ),
                quality.for_minutes, quality.min_macro_f1, "liveMacroF1", "minMacroF1",
                above=False,
                what=f"live macro-F1 of {quality.adapter_deployment}/{quality.adapter}",
            )
        )  # fmt: skip
    return found


def _ask(watch: Watch, name: str, namespace: str, settings: Settings) -> TriggerCheck:
    """Ask Prometheus what a trigger watches. Every outcome is recorded in the schedule's
    metrics; an error is returned, never swallowed."""
    if not settings.prometheus_url:
        return TriggerCheck(
            error="the operator has no Prometheus URL (chart value canaryAnalysis.prometheusUrl)",
            reason="PrometheusNotConfigured",
        )
    try:
        value = canary.scalar(settings.prometheus_url, watch.promql)
    except canary.PrometheusError as exc:
        metrics.SCHEDULE_QUERY_ERRORS.labels(namespace, name).inc()
        return TriggerCheck(error=str(exc)[:500])
    if value is not None:
        metrics.SCHEDULE_TRIGGER_VALUE.labels(namespace, name, watch.value_kind).set(value)
    metrics.SCHEDULE_TRIGGER_VALUE.labels(namespace, name, watch.bound_kind).set(watch.bound)
    return TriggerCheck(fires=watch.fires(value), value=value)


def _promote(
    spec: FineTuneScheduleSpec, namespace: str, run: dict[str, Any], body: kopf.Body
) -> bool:
    """Add a run whose gates passed to the AdapterDeployment as a canary; False if it cannot
    be now (a canary is in traffic, the adapter is unknown)."""
    target = spec.promote
    assert target is not None
    try:
        deployment = _custom().get_namespaced_custom_object(
            GROUP, VERSION, namespace, "adapterdeployments", target.adapter_deployment
        )
    except ApiException as exc:
        kopf.warn(
            body, reason="PromotionSkipped", message=f"{target.adapter_deployment}: {exc.reason}"
        )
        return False
    adapters = deployment["spec"]["adapters"]
    entry = next((a for a in adapters if a["name"] == target.adapter), None)
    if entry is None:
        kopf.warn(
            body,
            reason="PromotionSkipped",
            message=f"no adapter {target.adapter!r} in {target.adapter_deployment}",
        )
        return False
    run_entry = {"version": run["name"], "source": {"fineTuneJob": run["name"]}}
    try:
        traffic.add_canary(entry["versions"], run_entry, target.canary_percent)
    except traffic.TrafficError as exc:
        kopf.warn(
            body,
            reason="PromotionSkipped",
            message=f"{target.adapter_deployment}/{target.adapter}: {exc}; {run['name']} waits",
        )
        return False
    _custom().patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", target.adapter_deployment,
        {"spec": {"adapters": adapters}},
    )  # fmt: skip
    kopf.info(
        body,
        reason="Promoted",
        message=f"{run['name']} added to {target.adapter_deployment}/{target.adapter} at "
        f"{target.canary_percent} % (canary analysis decides)",
    )
    return True


@dataclass(frozen=True)
class _Due:
    """A run to start now: why, for which time, and what started it (cron, drift, quality)."""

    reason: str
    when: dt.datetime
    trigger: str


def _cron_due(
    spec: FineTuneScheduleSpec, status: kopf.Status, meta: kopf.Meta, now: dt.datetime
) -> _Due | None:
    """The cron's latest time since the last run, if one is due."""
    if not spec.schedule or spec.suspend:
        return None
    last = schedule.parse_time(status.get("lastScheduleTime")) or schedule.parse_time(
        meta.get("creationTimestamp")
    )
    assert last is not None
    when = schedule.due(spec.schedule, spec.time_zone, last, now)
    if when is None:
        return None
    return _Due(
        f"scheduled for {schedule.format_time(when)} ({spec.schedule} {spec.time_zone})",
        when,
        "cron",
    )


def _trigger_due(
    watch: Watch,
    name: str,
    namespace: str,
    status: kopf.Status,
    conditions: list[Condition],
    generation: int,
    settings: Settings,
    body: kopf.Body,
    now: dt.datetime,
) -> tuple[_Due | None, list[Condition]]:
    """A trigger that fired (outside the quiet time after the last trigger), and its
    condition saying whether Prometheus could be asked."""
    quiet_until = schedule.parse_time(status.get("lastTriggerTime"))
    if quiet_until is not None and now < quiet_until + dt.timedelta(minutes=watch.for_minutes):
        return None, conditions
    check = _ask(watch, name, namespace, settings)
    events = watch.condition.removesuffix("Trigger")
    if check.error is not None:
        message = f"{watch.kind} trigger not evaluated: {check.error}"
        if check.reason == "QueryFailed":  # each failure; a missing URL is a setting
            kopf.warn(body, reason=f"{events}QueryFailed", message=message[:1000])
        conditions = set_condition(
            conditions, watch.condition, "False", check.reason, message, utc_now(), generation
        )
    else:
        extreme = "lowest" if watch.above else "highest"
        seen = "no series yet" if check.value is None else f"{extreme} {check.value:.3g}"
        conditions = set_condition(
            conditions, watch.condition, "True", "Watching",
            f"{watch.kind} query answered ({seen})", utc_now(), generation,
        )  # fmt: skip
    if not check.fires:
        return None, conditions
    kopf.info(body, reason=f"{events}Triggered", message=check.fires[:1000])
    return _Due(check.fires, now, watch.kind), conditions


def _start(
    due: _Due,
    spec: FineTuneScheduleSpec,
    name: str,
    namespace: str,
    active: list[dict[str, Any]],
    status: kopf.Status,
    body: kopf.Body,
) -> list[dict[str, Any]]:
    """Start the due run under the concurrency policy; the runs active afterwards."""
    run = schedule.run_name(name, due.when, due.trigger)
    if active and spec.concurrency_policy == "Forbid":
        if due.trigger == "cron":
            running = ", ".join(r["name"] for r in active)
            kopf.info(
                body,
                reason="RunSkipped",
                message=f"{run} skipped: {running} still running (Forbid)",
            )
        return active
    if active and spec.concurrency_policy == "Replace":
        for old in active:
            _delete_run(namespace, old["name"])
            kopf.info(
                body, reason="RunReplaced", message=f"Deleted FineTuneJob {old['name']} (Replace)"
            )
        active = []
    if _create_run(
        body, namespace, name, run, spec, due.reason, _previous(spec, namespace, status)
    ):
        started = dt.datetime.now(dt.UTC).timestamp()
        metrics.SCHEDULE_LAST_RUN.labels(namespace, name, due.trigger).set(started)
        return [{"name": run}]
    return active


def _keep_history(
    spec: FineTuneScheduleSpec,
    namespace: str,
    runs: list[dict[str, Any]],
    status: kopf.Status,
    body: kopf.Body,
    update: dict[str, Any],
) -> None:
    """Drop finished runs beyond the history limits; record the last successful run and
    promote it (when the schedule promotes)."""
    finished = [schedule.Run(r["name"], r["phase"], r["created"]) for r in runs]
    for old in schedule.over_history(
        finished, spec.successful_jobs_history_limit, spec.failed_jobs_history_limit
    ):
        _delete_run(namespace, old)
    succeeded = sorted((r for r in runs if r["phase"] == "Succeeded"), key=lambda r: r["created"])
    if not succeeded:
        return
    latest = succeeded[-1]
    update["lastSuccessfulJob"] = {
        "name": latest["name"],
        "adapter": latest["adapter"],
        "metrics": latest["metrics"],
    }
    if (
        spec.promote is not None
        and status.get("lastPromotedJob") != latest["name"]
        and _promote(spec, namespace, latest, body)
    ):
        update["lastPromotedJob"] = latest["name"]


def _invalid(
    exc: ValidationError,
    name: str,
    namespace: str,
    status: kopf.Status,
    generation: int,
    patch: kopf.Patch,
    body: kopf.Body,
) -> None:
    message = format_validation_error(exc, f"FineTuneSchedule {namespace}/{name}")
    conditions = set_condition(
        read_conditions(status), "Ready", "False", "InvalidSpec", message, utc_now(), generation
    )
    if not same_conditions(status, conditions):
        patch.status.update({"conditions": dump_conditions(conditions)})
        kopf.warn(body, reason="InvalidSpec", message=message[:1000])


def tick(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    runs_by_schedule: kopf.Index,
    **_: Any,
) -> None:
    """Start due runs, apply the concurrency policy and history limits, promote, write status."""
    settings: Settings = memo.settings
    generation = int(meta.get("generation") or 0)
    try:
        parsed = FineTuneScheduleSpec.model_validate(dict(spec))
    except ValidationError as exc:
        _invalid(exc, name, namespace, status, generation, patch, body)
        return
    now = dt.datetime.now(dt.UTC)
    uid = meta.get("uid")
    runs = [r for r in runs_by_schedule.get((namespace, name), []) if r["ownerUid"] == uid]
    active = [r for r in runs if r["phase"] not in TERMINAL]
    update: dict[str, Any] = {}
    conditions = read_conditions(status)

    # What is due: the cron's latest time since the last run, or a trigger that fired.
    due = _cron_due(parsed, status, meta, now)
    for watch in watches(parsed, namespace, settings):
        if due is not None or parsed.suspend or active:
            break
        due, conditions = _trigger_due(
            watch, name, namespace, status, conditions, generation, settings, body, now
        )
        if due is not None:
            update["lastTriggerTime"] = schedule.format_time(now)
    if due is not None:
        active = _start(due, parsed, name, namespace, active, status, body)
        if due.trigger == "cron":
            update["lastScheduleTime"] = schedule.format_time(due.when)

    _keep_history(parsed, namespace, runs, status, body, update)

    update["active"] = sorted(r["name"] for r in active)
    update["nextScheduleTime"] = None
    if parsed.schedule and not parsed.suspend:
        last = schedule.parse_time(update.get("lastScheduleTime") or status.get("lastScheduleTime"))
        update["nextScheduleTime"] = schedule.format_time(
            schedule.next_time(parsed.schedule, parsed.time_zone, max(last or now, now))
        )
    ready = set_condition(
        conditions,
        "Ready",
        "False" if parsed.suspend else "True",
        "Suspended" if parsed.suspend else "Scheduling",
        "suspended: no run starts" if parsed.suspend else "runs start when due",
        utc_now(),
        generation,
    )
    update["conditions"] = dump_conditions(ready)
    update["observedGeneration"] = generation
    if any(status.get(k) != v for k, v in update.items()):
        patch.status.update(update)


def register_timers(interval: float) -> None:
    """The schedule's timer (its interval is an operator setting, known only at startup)."""
    kopf.timer(GROUP, VERSION, PLURAL, interval=interval)(tick)
