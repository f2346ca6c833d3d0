"""FineTuneJob status from observed state: the training Job, its Pods and the trainer's
termination message. Pure functions, unit-tested without a cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from sectune.contract import TrainerResult, TrainingProgress
from sectune_operator.api import Condition, DatasetStatus, FineTuneJobStatus, Progress
from sectune_operator.builders.finetunejob import CONTAINER

TERMINAL = ("Succeeded", "Failed")
ACTIVE = ("Preparing", "Training", "Evaluating")
"""Phases in which a trainer runs."""


def utc_now() -> str:
    """Now, as condition timestamps are written (RFC 3339, seconds, UTC)."""
    import datetime as dt

    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


CONDITION_TYPES = (
    "Ready",
    "Suspended",
    "Training",
    "Evaluated",
    "GatesPassed",
    "Succeeded",
    "Failed",
)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Conditions with `type_` set; lastTransitionTime moves only when the status changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    changed = previous is None or previous.status != status
    condition = Condition(
        type=type_,
        status=status,  # type: ignore[arg-type]
        reason=reason[:1024],
        message=message[:32768],
        last_transition_time=now if changed else (previous.last_transition_time or now),  # type: ignore[union-attr]
        observed_generation=generation,
    )
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    out = [c for c in conditions if c.type != type_] + [condition]
    return sorted(out, key=lambda c: order.get(c.type, len(order)))


def read_conditions(status: Mapping[str, Any]) -> list[Condition]:
    """The conditions of a status as read from the cluster (one that does not parse, written
    by hand, is dropped and written anew)."""
    conditions = []
    for raw in status.get("conditions") or []:
        try:
            conditions.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return conditions


def dump(model: BaseModel) -> dict[str, Any]:
    """A status model as it is written: camelCase, unset fields left out."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def dump_conditions(conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    return [dump(c) for c in conditions]


def same_conditions(old: Mapping[str, Any], new: Sequence[Condition]) -> bool:
    """Whether writing `new` would change what the conditions say (transition times aside)."""
    said = {c.type: (c.status, c.reason, c.message) for c in read_conditions(old)}
    return said == {c.type: (c.status, c.reason, c.message) for c in new}


def termination_message(pod: dict[str, Any]) -> TrainerResult | None:
    """The trainer's result from a finished pod, if it wrote one (sectune.contract)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != CONTAINER:
            continue
        terminated = (status.get("state") or {}).get("terminated") or {}
        message = terminated.get("message")
        if not message:
            return None
        exit_code = terminated.get("exitCode")
        parsed = TrainerResult.parse(message, exit_code)
        if parsed is not None:
            return parsed
        # FallbackToLogsOnError: the log tail, not a result. Keep it as the message.
        return TrainerResult(
            phase="Failed", reason="TrainerError", message=message[-1000:], exit_code=exit_code
        )
    return None


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_ and condition.get("status") == "True":
            return dict(condition)
    return None


def _finished_pods(pods: list[dict[str, Any]], phase: str) -> list[dict[str, Any]]:
    done = [p for p in pods if (p.get("status") or {}).get("phase") == phase]
    return sorted(done, key=lambda p: p["metadata"].get("creationTimestamp", ""))


def apply_result(status: FineTuneJobStatus, result: TrainerResult | None) -> None:
    """Set what a trainer's result says on `status`: the one mapping from sectune.contract's
    TrainerResult to FineTuneJobStatus (what the result does not say stays as it was)."""
    if result is None:
        return
    if result.adapter and result.adapter.uri:
        status.adapter = result.adapter
    if result.metrics:
        status.metrics = dict(result.metrics)
    if result.gates:
        status.gates = list(result.gates)
        passed = sum(g.passed for g in result.gates)
        status.gates_summary = f"{passed}/{len(result.gates)} passed"
    dataset = result.dataset
    if dataset is not None:
        status.dataset = DatasetStatus(
            digest=dataset.digest,
            train_examples=dataset.counts.get("train"),
            validation_examples=dataset.counts.get("validation"),
            skipped=dataset.skipped,
            redactions=dataset.redactions,
            quality=dataset.quality,
        )


def read_job_status(current: Mapping[str, Any]) -> FineTuneJobStatus:
    """A FineTuneJob's status as read from the cluster (fields it does not know ignored; one
    that does not parse, edited by hand, starts anew from its conditions and phase)."""
    known = {f.alias or n for n, f in FineTuneJobStatus.model_fields.items()}
    try:
        return FineTuneJobStatus.model_validate({k: v for k, v in current.items() if k in known})
    except ValidationError:
        return FineTuneJobStatus(conditions=read_conditions(current))


def derive_status(
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    current: dict[str, Any],
    generation: int | None,
    now: str,
    attempts: int = 0,
) -> dict[str, Any]:
    """The FineTuneJob status that the Job and Pods imply (a new dict; `current` untouched).
    `attempts`: training pods started so far, as counted by the caller (pods come and go)."""
    status = read_job_status(current)
    conditions = status.conditions
    status.observed_generation = generation
    if status.phase in TERMINAL or job is None:
        return dump(status)

    status.attempts = max(status.attempts or 0, attempts)
    newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)
    if newest is not None:
        status.pod = newest["metadata"]["name"]
    job_status = job.get("status") or {}
    if job_status.get("startTime") and not status.start_time:
        status.start_time = job_status["startTime"]
    complete, failed = _job_condition(job, "Complete"), _job_condition(job, "Failed")
    single_pod = ((job.get("spec") or {}).get("completions") or 1) == 1
    if not complete and not failed and single_pod and _finished_pods(pods, "Succeeded"):
        # One completion needed and the trainer's pod exited 0: the Job controller will mark
        # the Job Complete, but when it is busy that takes a minute; the result is here now.
        complete = {"lastTransitionTime": now}

    if complete:
        succeeded = _finished_pods(pods, "Succeeded")
        result = termination_message(succeeded[-1]) if succeeded else None
        apply_result(status, result)
        status.phase = "Succeeded"
        status.completion_time = (
            job_status.get("completionTime") or complete.get("lastTransitionTime") or now
        )
        message = (result.message if result else "") or "training, evaluation and gates finished"
        for type_, value, reason in (
            ("Training", "False", "Completed"),
            ("Evaluated", "True", "Evaluated"),
            ("GatesPassed", "True", "GatesPassed"),
            ("Succeeded", "True", "Succeeded"),
        ):
            conditions = set_condition(conditions, type_, value, reason, message, now, generation)
        status.progress = (status.progress or Progress()).model_copy(update={"percent": 100})
    elif failed:
        failed_pods = _finished_pods(pods, "Failed")
        result = termination_message(failed_pods[-1]) if failed_pods else None
        apply_result(status, result)
        reason = (result.reason if result else "") or failed.get("reason") or "Failed"
        message = (
            (result.message if result else "") or failed.get("message") or "the training Job failed"
        )
        if reason == "GatesFailed":
            failing = [g.name for g in status.gates if not g.passed]
            message = "gates failed: " + ", ".join(failing) if failing else message
            conditions = set_condition(
                conditions, "Evaluated", "True", "Evaluated", "evaluation finished", now, generation
            )
            conditions = set_condition(
                conditions, "GatesPassed", "False", "GatesFailed", message, now, generation
            )
        status.phase = "Failed"
        status.completion_time = failed.get("lastTransitionTime") or now
        conditions = set_condition(
            conditions, "Training", "False", reason, message, now, generation
        )
        conditions = set_condition(conditions, "Failed", "True", reason, message, now, generation)
    elif (job.get("spec") or {}).get("suspend"):
        status.phase = "Pending"
        conditions = set_condition(
            conditions,
            "Suspended",
            "True",
            "Suspended",
            "the training Job is suspended; checkpoints are kept",
            now,
            generation,
        )
        conditions = set_condition(
            conditions, "Training", "False", "Suspended", "suspended", now, generation
        )
    else:
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
        if any(c.type == "Suspended" for c in conditions):
            conditions = set_condition(
                conditions, "Suspended", "False", "Resumed", "", now, generation
            )
        if running:
            # Preparing (data, model) until the trainer reports its first step; Evaluating once
            # it reported its last (evaluation, probes and publishing follow).
            progress = status.progress or Progress()
            step, total = progress.step, progress.total_steps
            if step and total and step >= total:
                status.phase = "Evaluating"
            else:
                status.phase = "Training" if step else "Preparing"
            pod = running[-1]["metadata"]["name"]
            conditions = set_condition(
                conditions,
                "Training",
                "True",
                "PodRunning",
                f"pod {pod} is running",
                now,
                generation,
            )
        elif current.get("phase") in ACTIVE and _finished_pods(pods, "Succeeded"):
            pass  # one node's trainer finished; the others (an Indexed Job) have not yet
        else:
            status.phase = "Pending"
    status.conditions = conditions
    return dump(status)


def progress_from_metrics(text: str) -> dict[str, Any] | None:
    """status.progress from the trainer's Prometheus exposition (sectune.contract's
    TrainingProgress on METRICS_PORT)."""
    trained = TrainingProgress.from_exposition(text)
    if trained is None:
        return None
    step, total = trained.step, trained.total_steps
    progress = Progress(
        step=step,
        total_steps=total,
        percent=int(100 * step / total) if total else 0,
        loss=round(trained.loss, 4),
        tokens_per_second=round(trained.tokens_per_second, 1),
        eta_seconds=int(trained.eta_seconds),
        display=f"{step}/{total}",
    )
    return dump(progress)
