# mypy: disable-error-code="arg-type"
# (kopf types its callbacks as protocols listing every keyword it passes; handlers here name
# only the keywords they use, which is how kopf documents them.)
"""kopf handlers for FineTuneJob: thin. Parse, delegate to builders, apply, queue status.

Status is written by one writer and progress read by one poller (sectune_operator.
finetunejob_status); the handlers here validate and create the children, keep the indexes of
Jobs and Pods that status is derived from, and queue a refresh when a child changes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune import storage
from sectune.config import API_GROUP, API_VERSION, format_validation_error
from sectune_operator import finetunejob_status as job_status
from sectune_operator import kube, metrics
from sectune_operator.api import FineTuneJobSpec
from sectune_operator.builders.finetunejob import (
    JOB_LABEL,
    build_job,
    build_network_policy,
    build_service,
    child_name,
)
from sectune_operator.settings import Settings
from sectune_operator.status import (
    TERMINAL,
    dump,
    read_job_status,
    set_condition,
    utc_now,
)
from sectune_operator.tracking import Indexes, JobTracker, Key

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, "finetunejobs"
CLEANUP_TRIES = 6
SECRET_FOUND_TTL = 30.0
"""Seconds a Secret found to exist is not read again."""
LOGGER = logging.getLogger(__name__)


def _block(
    key: Key,
    memo: kopf.Memo,
    indexes: Indexes,
    body: kopf.Body,
    generation: int,
    reason: str,
    message: str,
    *,
    permanent: bool,
    delay: float = 15,
) -> NoReturn:
    """Stop reconciling with the reason in status: Failed for good (a bad spec), or Pending
    until the cause goes away (retried after `delay`). Written at once, not queued: the
    reason is in status before kopf logs the error."""

    def blocked(current: dict[str, Any], _state: dict[str, Any]) -> dict[str, Any]:
        status = read_job_status(current)
        status.conditions = set_condition(
            status.conditions, "Ready", "False", reason, message, utc_now(), generation
        )
        if permanent:
            status.conditions = set_condition(
                status.conditions, "Failed", "True", reason, message, utc_now(), generation
            )
        status.phase = "Failed" if permanent else (status.phase or "Pending")
        status.observed_generation = generation
        return dump(status)

    state = next(iter(indexes.states.get(key, [])), None)
    previous = state["status"].get("phase") if state else None
    job_status.write_status(key, memo.tracker, indexes, blocked, announce=False)
    if permanent and previous != "Failed":
        metrics.FINETUNEJOB_FAILURES.labels(key[0], reason).inc()
    if reason != "Queued":  # queueing is expected: neither an error nor a warning
        metrics.RECONCILE_ERRORS.labels(reason).inc()
        kopf.warn(body, reason="InvalidSpec" if permanent else reason, message=message)
    if permanent:
        raise kopf.PermanentError(message)
    raise kopf.TemporaryError(message, delay=delay)


def _local_uris(spec: FineTuneJobSpec) -> list[str]:
    """Fields holding file:// URIs (they would point into the pod's own filesystem)."""
    candidates = {
        "spec.baseModel.uri": spec.base_model.uri,
        "spec.dataset.train": spec.dataset.train,
        "spec.dataset.validation": spec.dataset.validation,
        "spec.dataset.test": spec.dataset.test,
        "spec.output.uri": spec.output.uri,
    }
    return [field for field, uri in candidates.items() if uri and uri.startswith("file://")]


def _missing_secrets(spec: FineTuneJobSpec, namespace: str, tracker: JobTracker) -> list[str]:
    """Secrets the job names that do not exist. One found in the last SECRET_FOUND_TTL seconds
    is not read again: a burst of jobs naming one storage Secret reads it once. A missing one
    is always read again, so creating it unblocks the jobs at their next retry."""
    core = kube.core()
    wanted = {
        "spec.output.credentials": spec.output.credentials,
        "spec.hfTokenSecret": spec.hf_token_secret,
        **{f"spec.imagePullSecrets[{i}]": s for i, s in enumerate(spec.image_pull_secrets)},
    }
    missing = []
    for field, ref in wanted.items():
        if ref is None or tracker.secret_found_recently((namespace, ref.name), SECRET_FOUND_TTL):
            continue
        try:
            # Only whether it exists: the body (the Secret's data) is never decoded.
            kube.discard(core.read_namespaced_secret(ref.name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise
            missing.append(f"{field} (Secret {ref.name!r})")
        else:
            tracker.found_secret((namespace, ref.name))
    return missing


def _create(kind: str, body: dict[str, Any], namespace: str, logger: Any) -> bool:
    """Create a child; already-exists is success. Returns True if it was created now."""
    create = {
        "Service": kube.core().create_namespaced_service,
        "Job": kube.batch().create_namespaced_job,
        "NetworkPolicy": kube.networking().create_namespaced_network_policy,
    }[kind]
    try:
        # The created object is not read back: skip decoding it into client models.
        kube.discard(create(namespace, body, _preload_content=False))
    except ApiException as exc:
        if exc.status == 409:
            return False
        if exc.status >= 500 or exc.status == 429:  # the API server is busy: try again soon
            metrics.API_RETRIES.labels(f"create-{kind.lower()}").inc()
            raise kopf.TemporaryError(
                f"creating {kind} failed ({exc.status}); retrying", delay=5
            ) from None
        raise
    logger.info(f"Created {kind} {body['metadata']['name']}")
    return True


def _active_jobs(jobs_index: kopf.Index, namespace: str) -> int:
    count = 0
    for (ns, _), store in jobs_index.items():
        for job in store:
            conditions = (job.get("status") or {}).get("conditions") or []
            finished = any(
                c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                for c in conditions
            )
            if ns == namespace and not finished and not (job.get("spec") or {}).get("suspend"):
                count += 1
    return count


def _unfinished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


@kopf.on.create(GROUP, VERSION, PLURAL, retries=10, backoff=5, when=_unfinished)
@kopf.on.resume(GROUP, VERSION, PLURAL, retries=10, backoff=5, when=_unfinished)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec", retries=10, backoff=5, when=_unfinished)
def reconcile(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: Any,
    **kwargs: Any,
) -> None:
    """Validate the spec, create the Job (+ NetworkPolicy, + Service), keep Job.suspend in step."""
    settings: Settings = memo.settings
    generation = int(meta.get("generation") or 0)
    started = time.monotonic()
    key = (namespace, name)
    indexes = _indexes(memo, **kwargs)
    try:
        parsed = FineTuneJobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        message = format_validation_error(exc, f"FineTuneJob {namespace}/{name}")
        _block(key, memo, indexes, body, generation, "InvalidSpec", message, permanent=True)

    local = _local_uris(parsed) if not settings.allow_file_uris else []
    if local:
        message = (
            f"{', '.join(local)}: file:// URIs point into the training pod's own filesystem; "
            "use s3:// in a cluster (hf:// for base models)"
        )
        _block(
            key,
            memo,
            indexes,
            body,
            generation,
            "LocalURINotAllowed",
            message,
            permanent=True,
        )
    if not parsed.output.uri:
        message = "spec.output.uri: set an s3:// prefix for the adapter; a pod's disk is gone when it ends"
        _block(key, memo, indexes, body, generation, "OutputRequired", message, permanent=True)

    indexed_job = next(iter(indexes.jobs.get(key, [])), None)
    if indexed_job is not None:
        # Children exist (the Job is created last): only keep Job.suspend in step. Costs no
        # request when nothing changed, so a repeated reconcile (kopf after a restart, or a
        # creation event seen again under load) is free.
        _sync_suspend(name, namespace, parsed, indexed_job, body, logger)
    else:
        _create_children(key, memo, indexes, body, parsed, generation, logger)

    def accepted(current: dict[str, Any], _state: dict[str, Any]) -> dict[str, Any]:
        status = read_job_status(current)
        status.conditions = set_condition(
            status.conditions, "Ready", "True", "JobCreated",
            f"Job {child_name(name)} created", utc_now(), generation,
        )  # fmt: skip
        status.observed_generation = generation
        status.phase = status.phase or "Pending"
        status.start_time = status.start_time or utc_now()
        return dump(status)

    job_status.queue_status(key, memo.tracker, accepted)
    metrics.RECONCILE_DURATION.observe(time.monotonic() - started)


def _create_children(
    key: Key,
    memo: kopf.Memo,
    indexes: Indexes,
    body: kopf.Body,
    parsed: FineTuneJobSpec,
    generation: int,
    logger: Any,
) -> None:
    """NetworkPolicy and Service (for several nodes) when wanted, then the Job; blocked while
    a Secret the job names is missing or the namespace's Job quota is used up."""
    settings: Settings = memo.settings
    namespace, name = key
    missing = _missing_secrets(parsed, namespace, memo.tracker)
    if missing:
        message = f"waiting for {', '.join(missing)}: create it in namespace {namespace}"
        _block(key, memo, indexes, body, generation, "SecretNotFound", message, permanent=False)
    if (
        settings.max_concurrent_jobs
        and _active_jobs(indexes.jobs, namespace) >= settings.max_concurrent_jobs
    ):
        message = f"{settings.max_concurrent_jobs} training Jobs already run in {namespace}; queued"
        _block(key, memo, indexes, body, generation, "Queued", message, permanent=False, delay=10)
    children: list[tuple[str, dict[str, Any]]] = []
    if settings.network_policies:
        children.append(("NetworkPolicy", build_network_policy(name, settings)))
    if parsed.resources.nodes > 1:
        children.append(("Service", build_service(name)))
    children.append(("Job", build_job(name, parsed, settings)))
    created = []
    for kind, child in children:
        kopf.adopt(child, owner=body)
        if _create(kind, child, namespace, logger):
            created.append(f"{kind} {child['metadata']['name']}")
    if created:  # one Event for all of them: Events are API requests too
        job_status.post_event(body, "Normal", "Created", "Created " + ", ".join(created))


def _sync_suspend(
    name: str,
    namespace: str,
    spec: FineTuneJobSpec,
    job: dict[str, Any],
    body: kopf.Body,
    logger: Any,
) -> None:
    """`spec.suspend` onto the Job (`job`: its index summary), unless Kueue owns suspension."""
    if spec.queue_name or bool((job.get("spec") or {}).get("suspend")) == spec.suspend:
        return
    kube.batch().patch_namespaced_job(
        child_name(name), namespace, {"spec": {"suspend": spec.suspend}}
    )
    action = "Suspended" if spec.suspend else "Resumed"
    logger.info(f"{action} Job {child_name(name)}")
    kopf.info(body, reason=action, message=f"{action} Job {child_name(name)}")


# --------------------------------------------------------------------------- observed state


# The indexes keep only what status derivation reads: at 1,000 jobs whole bodies of every Job
# and Pod are most of the operator's memory.


def _job_summary(body: kopf.Body) -> dict[str, Any]:
    status = body.get("status") or {}
    return {
        "metadata": {"name": body["metadata"]["name"]},
        "spec": {k: (body.get("spec") or {}).get(k) for k in ("suspend", "completions")},
        "status": {
            k: status[k] for k in ("startTime", "completionTime", "conditions") if k in status
        },
    }


def _pod_summary(body: kopf.Body) -> dict[str, Any]:
    status = body.get("status") or {}
    containers = [
        {"name": c.get("name"), "state": {"terminated": (c.get("state") or {}).get("terminated")}}
        for c in status.get("containerStatuses") or []
    ]
    return {
        "metadata": {k: body["metadata"].get(k) for k in ("name", "creationTimestamp")},
        "status": {
            "phase": status.get("phase"),
            "podIP": status.get("podIP"),
            "containerStatuses": containers,
        },
    }


# Indexers and the child event handler are coroutines: they only compute or queue, and kopf
# runs a plain function in a worker thread, a hop per event that costs more than the work.


@kopf.index("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
async def jobs_by_owner(
    namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any
) -> dict[Any, Any]:
    return {(namespace, labels[JOB_LABEL]): _job_summary(body)}


@kopf.index("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
async def pods_by_owner(
    namespace: str, labels: kopf.Labels, body: kopf.Body, uid: str, memo: kopf.Memo, **_: Any
) -> dict[Any, Any]:
    # Remember every pod seen, even one deleted before the next status refresh (preemption).
    memo.tracker.saw_pod((namespace, labels[JOB_LABEL]), uid)
    return {(namespace, labels[JOB_LABEL]): _pod_summary(body)}


@kopf.index(GROUP, VERSION, PLURAL)
async def finetunejob_states(
    namespace: str, name: str, status: kopf.Status, meta: kopf.Meta, uid: str, **_: Any
) -> dict[Any, Any]:
    """What a status write needs of each FineTuneJob, so Job and Pod events can refresh it."""
    return {
        (namespace, name): {
            "status": dict(status),
            "generation": int(meta.get("generation") or 0),
            "uid": uid,
            "resourceVersion": int(meta.get("resourceVersion") or 0),
        }
    }


def _indexes(
    memo: kopf.Memo, finetunejob_states: kopf.Index, jobs_by_owner: kopf.Index,
    pods_by_owner: kopf.Index, **_: Any,
) -> Indexes:  # fmt: skip
    """kopf's live indexes, remembered for the progress poller (which is not a handler)."""
    tracker: JobTracker = memo.tracker
    if tracker.indexes is None:
        tracker.indexes = Indexes(finetunejob_states, jobs_by_owner, pods_by_owner)
    return tracker.indexes


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
async def child_changed(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A training Job or pod changed (created, scheduled, running, suspended, finished,
    preempted): refresh the FineTuneJob that owns it."""
    job_status.refresh((namespace, labels[JOB_LABEL]), memo.tracker, _indexes(memo, **kwargs))


# --------------------------------------------------------------------------- deletion


class CleanupRefused(Exception):
    """Deleting this job's artifacts would act beyond what the job itself may do."""


def _cleanup_client(
    spec: FineTuneJobSpec, prefix: storage.Location, namespace: str, settings: Settings
) -> Any:
    """An S3 client holding the job's own credentials, for an endpoint the operator's settings
    allow. The operator never deletes with its own identity (a tenant could name another
    tenant's prefix), never calls an endpoint a tenant's Secret invents, and never deletes
    file:// paths (they would be the operator pod's own files) unless reconcile allows them."""
    import base64

    if prefix.scheme == "file":
        if not settings.allow_file_uris:
            raise CleanupRefused(
                f"{prefix.uri}: file:// URIs are not allowed in this cluster; nothing deleted"
            )
        return None
    if prefix.scheme != "s3":
        raise CleanupRefused(f"{prefix.uri}: only s3:// artifacts can be deleted")
    if spec.output.credentials is None:
        raise CleanupRefused(
            "spec.output.credentials is not set: the operator deletes only with the job's own "
            "storage credentials, never its own; artifacts kept"
        )
    secret = kube.core().read_namespaced_secret(spec.output.credentials.name, namespace)
    credentials = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    endpoint = credentials.get("AWS_ENDPOINT_URL", "").strip().rstrip("/")
    if endpoint and endpoint not in settings.storage_endpoints:
        raise CleanupRefused(
            f"the Secret {spec.output.credentials.name} names AWS_ENDPOINT_URL {endpoint[:200]}, "
            "which the operator is not allowed to call (chart value storage.endpoints); "
            "artifacts kept"
        )
    try:
        return storage.tenant_s3_client(credentials)
    except storage.StorageError as exc:
        raise CleanupRefused(
            f"the Secret {spec.output.credentials.name}: {exc}; artifacts kept"
        ) from None


@kopf.on.delete(
    GROUP, VERSION, PLURAL,
    when=lambda spec, **_: spec.get("cleanupPolicy") == "Delete",
    retries=CLEANUP_TRIES, backoff=10,
)  # fmt: skip
def delete_artifacts(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    annotations: kopf.Annotations,
    body: kopf.Body,
    memo: kopf.Memo,
    retry: int,
    logger: Any,
    **_: Any,
) -> None:
    """cleanupPolicy: Delete removes <output.uri>/<name>/ from storage before the object goes.
    Children go by owner references. A storage error is retried, reported as a Warning Event,
    and after the last try the finalizer is released anyway (never blocks forever)."""
    settings: Settings = memo.settings
    parsed = FineTuneJobSpec.model_validate(dict(spec))
    if not parsed.output.uri:
        return
    prefix = storage.parse_uri(parsed.output.uri).join(name)
    if annotations.get(settings.skip_cleanup_annotation) == "true":
        kopf.warn(
            body,
            reason="CleanupSkipped",
            message=f"artifacts kept at {prefix.uri} ({settings.skip_cleanup_annotation})",
        )
        return
    try:
        deleted = storage.delete_prefix(
            prefix, client=_cleanup_client(parsed, prefix, namespace, settings)
        )
    except CleanupRefused as exc:
        kopf.warn(body, reason="CleanupRefused", message=str(exc))
        logger.warning(f"Kept artifacts under {prefix.uri}: {exc}")
        return
    except (storage.StorageError, ApiException) as exc:
        reason = exc.reason if isinstance(exc, ApiException) else str(exc)
        if retry + 1 >= CLEANUP_TRIES:
            message = f"gave up deleting {prefix.uri} after {retry + 1} tries ({reason}); the artifacts remain"
            kopf.warn(body, reason="CleanupFailed", message=message)
            logger.error(message)
            return
        message = (
            f"could not delete {prefix.uri}: {reason}; retrying. To release the job without "
            f"deleting its artifacts: kubectl annotate ftj {name} {settings.skip_cleanup_annotation}=true"
        )
        kopf.warn(body, reason="CleanupFailed", message=message)
        raise kopf.TemporaryError(message, delay=10) from None
    logger.info(f"Deleted {deleted} artifact(s) under {prefix.uri}")
    kopf.info(
        body, reason="ArtifactsDeleted", message=f"Deleted {deleted} object(s) under {prefix.uri}"
    )
