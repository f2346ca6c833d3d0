# mypy: disable-error-code="arg-type"
# (kopf types its callbacks as protocols listing every keyword it passes; handlers here name
# only the keywords they use, which is how kopf documents them.)
"""kopf handlers for FineTuneJob: thin. Parse, delegate to builders, apply, patch status.

Status is observed state, derived (sectune_operator.status) from indexes of the Jobs and Pods
the operator labelled whenever one of them changes. Every caller queues its change
(`_queue_status`); one writer thread coalesces a job's changes of the last second into one
patch (`_write_status`). While a trainer runs, one poller reads its progress.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

import kopf
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune import storage
from sectune.config import format_validation_error
from sectune_operator import kube, metrics, scrape
from sectune_operator.api import FineTuneJobSpec
from sectune_operator.builders.finetunejob import (
    JOB_LABEL,
    METRICS_PORT,
    build_job,
    build_network_policy,
    build_service,
    child_name,
)
from sectune_operator.events import EventPoster
from sectune_operator.settings import Settings
from sectune_operator.status import (
    TERMINAL,
    derive_status,
    dump_conditions,
    progress_from_metrics,
    read_conditions,
    set_condition,
    utc_now,
)
from sectune_operator.tracking import Indexes, JobTracker, Key, StatusChange

GROUP, VERSION, PLURAL = "sectune.io", "v1alpha1", "finetunejobs"
CLEANUP_TRIES = 6
PROGRESS_BACKOFF = 15.0
"""Seconds before a trainer that did not answer its metrics port is asked again."""
PROGRESS_READERS = 8
"""Trainers asked for their progress at once (a read waits at most a second)."""
SECRET_FOUND_TTL = 30.0
"""Seconds a Secret found to exist is not read again."""
STATUS_WRITERS = 8
"""Status patches in flight at once."""
_EVENTS = EventPoster(kube.post_event)
STATUS_RETRY = 2.0
"""Seconds before a status patch the API server refused (busy, unavailable) is tried again."""
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

    def blocked(status: dict[str, Any], _state: dict[str, Any]) -> dict[str, Any]:
        conditions = set_condition(
            read_conditions(status), "Ready", "False", reason, message, utc_now(), generation
        )
        if permanent:
            conditions = set_condition(
                conditions, "Failed", "True", reason, message, utc_now(), generation
            )
        phase = "Failed" if permanent else (status.get("phase") or "Pending")
        return {
            **status,
            "phase": phase,
            "conditions": dump_conditions(conditions),
            "observedGeneration": generation,
        }

    state = next(iter(indexes.states.get(key, [])), None)
    previous = state["status"].get("phase") if state else None
    _write_status(key, memo.tracker, indexes, blocked, announce=False)
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

    def accepted(status: dict[str, Any], _state: dict[str, Any]) -> dict[str, Any]:
        conditions = set_condition(
            read_conditions(status), "Ready", "True", "JobCreated",
            f"Job {child_name(name)} created", utc_now(), generation,
        )  # fmt: skip
        return {
            **status,
            "conditions": dump_conditions(conditions),
            "observedGeneration": generation,
            "phase": status.get("phase") or "Pending",
            "startTime": status.get("startTime") or utc_now(),
        }

    _queue_status(key, memo.tracker, accepted)
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
        _post_event(body, "Normal", "Created", "Created " + ", ".join(created))


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


def _announce(
    body: dict[str, Any], namespace: str, old: dict[str, Any], new: dict[str, Any]
) -> None:
    """Events and metrics for a phase transition (not for the first phase: "Created" said it).
    Posted here, not through kopf: the status writer is not a kopf handler."""
    phase = new.get("phase")
    if not old.get("phase") and phase == "Pending":
        return
    failed = next(
        (c for c in new.get("conditions", []) if c["type"] == "Failed" and c["status"] == "True"),
        None,
    )
    if failed:
        _post_event(body, "Warning", failed["reason"], failed["message"])
        metrics.FINETUNEJOB_FAILURES.labels(namespace, failed["reason"]).inc()
        if failed["reason"] == "GatesFailed":
            metrics.GATE_FAILURES.labels(namespace).inc()
    else:
        _post_event(body, "Normal", str(phase), f"FineTuneJob is {phase}")
    if phase in TERMINAL and new.get("startTime"):
        began = dt.datetime.fromisoformat(new["startTime"].replace("Z", "+00:00"))
        metrics.TRAINING_DURATION.observe((dt.datetime.now(dt.UTC) - began).total_seconds())


def _queue_status(
    key: Key, tracker: JobTracker, change: StatusChange, *, urgent: bool = False
) -> None:
    """Write `change` within a second, in one patch with the job's other changes until then;
    `urgent` (the trainer finished): at once, ahead of other jobs' changes."""
    tracker.statuses.put(key, change, urgent=urgent)


def _post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event later, behind a rate limit (sectune_operator.events), without holding up
    the handler or status writer that announces it. Only what the Event names is kept."""
    meta = body["metadata"]
    involved = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
    }
    _EVENTS.submit(involved, type_, reason, message)


def _write_status(
    key: Key, tracker: JobTracker, indexes: Indexes, change: StatusChange, *, announce: bool = True
) -> dict[str, Any] | None:
    """The one writer of FineTuneJob status (queued changes, and a blocked reconcile): applies
    `change` to the newest status known, patches only when it differs, and
    announces a phase transition. Returns the status written, None when nothing was."""
    state = next(iter(indexes.states.get(key, [])), None)
    if state is None:
        tracker.forget(key)  # deleted
        return None
    namespace, name = key
    with tracker.lock(key):
        # Our last patch may not have come back through the watch yet: build on it while the
        # index still shows what it was based on; anything newer in the index wins.
        status = state["status"]
        version, written = tracker.written.get(key, (0, None))
        if written is not None and state["resourceVersion"] < version:
            status = written
        else:
            tracker.written.pop(key, None)
        new = change(status, state)
        tracker.set_phase(key, new.get("phase"))
        if new == status:
            return None
        try:
            result = kube.custom_objects().patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, {"status": new}
            )
        except ApiException as exc:
            tracker.written.pop(key, None)
            if exc.status == 404:
                tracker.forget(key)
                return None
            metrics.API_RETRIES.labels("patch-status").inc()
            raise
        tracker.written[key] = (int(result["metadata"]["resourceVersion"]), new)
    if announce and new.get("phase") != status.get("phase"):
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace, "uid": state["uid"]},
        }
        _announce(body, namespace, status, new)
    return new


def _refresh(
    key: Key, tracker: JobTracker, indexes: Indexes, progress: dict[str, Any] | None = None
) -> None:
    """Derive a FineTuneJob's status from its Job and Pods (and the trainer's progress)."""

    def observed(status: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        if status.get("phase") in TERMINAL:
            return status
        current = {**status, "progress": progress} if progress else dict(status)
        job = next(iter(indexes.jobs.get(key, [])), None)
        pods = list(indexes.pods.get(key, []))
        # Every pod this process has seen (preempted ones included), or what status already
        # counted (pods deleted before a restart), whichever is more.
        attempts = max(int(status.get("attempts") or 0), tracker.pods_started(key))
        return derive_status(job, pods, current, state["generation"], utc_now(), attempts)

    pods = indexes.pods.get(key, [])
    finished = any((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods)
    _queue_status(key, tracker, observed, urgent=finished)


def _write_queued(
    key: Key, changes: list[StatusChange], tracker: JobTracker, indexes: Indexes
) -> None:
    def in_order(status: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        for change in changes:
            status = change(status, state)
        return status

    try:
        _write_status(key, tracker, indexes, in_order)
    except Exception as exc:  # one job's failure never stops the others' status
        refused = isinstance(exc, ApiException) and 400 <= exc.status < 500 and exc.status != 429
        if refused:  # retrying cannot change the API server's answer
            LOGGER.error(f"status of FineTuneJob {key[0]}/{key[1]} refused: {exc}")
        else:
            LOGGER.warning(f"status of FineTuneJob {key[0]}/{key[1]}: {exc}; retrying")
            tracker.statuses.retry(key, changes, STATUS_RETRY)
    finally:
        tracker.statuses.done(key)


def write_statuses(tracker: JobTracker, stop: threading.Event) -> None:
    """The status writer: takes each job's queued changes when due and patches them as one."""
    with ThreadPoolExecutor(STATUS_WRITERS, thread_name_prefix="status") as pool:
        while not stop.is_set():
            tracker.statuses.wait(0.5, STATUS_WRITERS)
            indexes = tracker.indexes
            if indexes is None:
                continue
            for key, changes in tracker.statuses.due(time.monotonic(), STATUS_WRITERS):
                pool.submit(_write_queued, key, changes, tracker, indexes)


@kopf.on.event("batch", "v1", "jobs", labels={JOB_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={JOB_LABEL: kopf.PRESENT})
async def child_changed(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any
) -> None:
    """A training Job or pod changed (created, scheduled, running, suspended, finished,
    preempted): refresh the FineTuneJob that owns it."""
    _refresh((namespace, labels[JOB_LABEL]), memo.tracker, _indexes(memo, **kwargs))


# --------------------------------------------------------------------------- progress


def _scrape_progress(pods: list[dict[str, Any]], settings: Settings) -> dict[str, Any] | None:
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    ip = scrape.pod_ip(running[-1]) if running else None
    if not ip:
        return None
    text = scrape.fetch_text(settings.progress_url_template.format(ip=ip, port=METRICS_PORT))
    return progress_from_metrics(text) if text is not None else None


def _read_progress(key: Key, tracker: JobTracker, indexes: Indexes, settings: Settings) -> None:
    now = time.monotonic()
    if tracker.quiet_until.get(key, 0.0) > now:
        return  # the trainer did not answer recently (still loading): ask again later
    progress = _scrape_progress(list(indexes.pods.get(key, [])), settings)
    if progress is None:
        tracker.quiet_until[key] = now + PROGRESS_BACKOFF
        return
    tracker.quiet_until.pop(key, None)
    _refresh(key, tracker, indexes, progress)


def poll_progress(tracker: JobTracker, settings: Settings, stop: threading.Event) -> None:
    """Every `status_interval` seconds, read the progress (step, loss, tokens/s, ETA) of the
    jobs whose trainer runs. One loop for all of them instead of a kopf timer per object:
    no per-object timer state, and no finalizer added and removed around each training run.
    Everything else in status follows Job and Pod events."""
    with ThreadPoolExecutor(PROGRESS_READERS, thread_name_prefix="progress") as pool:
        while not stop.wait(settings.status_interval):
            indexes = tracker.indexes
            if indexes is None:
                continue
            reads = {
                key: pool.submit(_read_progress, key, tracker, indexes, settings)
                for key in tracker.active()
            }
            for key, read in reads.items():
                try:
                    read.result()
                except Exception as exc:  # one job's failure never stops the others' progress
                    LOGGER.warning(f"progress of FineTuneJob {key[0]}/{key[1]}: {exc}")


def start_background(tracker: JobTracker, settings: Settings) -> threading.Event:
    """Start the status writer and the progress poller; set the event to stop both."""
    stop = threading.Event()
    for name, target, args in (
        ("status-writer", write_statuses, (tracker, stop)),
        ("progress-poller", poll_progress, (tracker, settings, stop)),
    ):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
    return stop


def phase_counts(tracker: JobTracker) -> dict[tuple[str, str], int]:
    """FineTuneJobs by (namespace, phase), as the index holds them: counted when Prometheus
    asks, not on every FineTuneJob event."""
    indexes = tracker.indexes
    if indexes is None:
        return {}
    for _ in range(3):  # kopf may change the index while this thread reads it
        try:
            entries = [(key, list(store)) for key, store in list(indexes.states.items())]
            break
        except RuntimeError:
            continue
    else:
        return {}
    counts: dict[tuple[str, str], int] = {}
    for (namespace, _name), store in entries:
        for state in store:
            key = (namespace, state["status"].get("phase") or "Pending")
            counts[key] = counts.get(key, 0) + 1
    return counts


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
