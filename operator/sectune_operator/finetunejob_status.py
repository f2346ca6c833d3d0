"""The one writer of FineTuneJob status, and the poller of running trainers' progress.

Status is observed state, derived (sectune_operator.status) from indexes of the Jobs and Pods
the operator labelled whenever one of them changes. Every caller queues its change
(`queue_status`); one writer thread coalesces a job's changes of the last second into one
patch (`write_status`) and announces phase transitions as Events and metrics. While a trainer
runs, one poller reads its progress from the pod's metrics port (sectune.contract) and queues
it the same way. Neither is a kopf handler: the handlers (handlers/finetunejob.py) and these
threads share the indexes and the tracker.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes.client.rest import ApiException

from sectune.config import API_GROUP, API_VERSION
from sectune.contract import METRICS_PORT
from sectune_operator import kube, metrics, scrape
from sectune_operator.events import EventPoster
from sectune_operator.settings import Settings
from sectune_operator.status import TERMINAL, derive_status, progress_from_metrics, utc_now
from sectune_operator.tracking import Indexes, JobTracker, Key, StatusChange

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, "finetunejobs"
PROGRESS_READERS = 8
"""Trainers asked for their progress at once (a read waits at most a second)."""
STATUS_WRITERS = 8
"""Status patches in flight at once."""
STATUS_RETRY = 2.0
"""Seconds before a status patch the API server refused (busy, unavailable) is tried again."""
_EVENTS = EventPoster(kube.post_event)
LOGGER = logging.getLogger(__name__)


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
        post_event(body, "Warning", failed["reason"], failed["message"])
        metrics.FINETUNEJOB_FAILURES.labels(namespace, failed["reason"]).inc()
        if failed["reason"] == "GatesFailed":
            metrics.GATE_FAILURES.labels(namespace).inc()
    else:
        post_event(body, "Normal", str(phase), f"FineTuneJob is {phase}")
    if phase in TERMINAL and new.get("startTime"):
        began = dt.datetime.fromisoformat(new["startTime"].replace("Z", "+00:00"))
        metrics.TRAINING_DURATION.observe((dt.datetime.now(dt.UTC) - began).total_seconds())


def queue_status(
    key: Key, tracker: JobTracker, change: StatusChange, *, urgent: bool = False
) -> None:
    """Write `change` within a second, in one patch with the job's other changes until then;
    `urgent` (the trainer finished): at once, ahead of other jobs' changes."""
    tracker.statuses.put(key, change, urgent=urgent)


def post_event(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post an Event later, behind a rate limit (sectune_operator.events), without holding up
    the handler or status writer that announces it. Only what the Event names is kept."""
    meta = body["metadata"]
    involved = {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid")},
    }
    _EVENTS.submit(involved, type_, reason, message)


def write_status(
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


def refresh(
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
    queue_status(key, tracker, observed, urgent=finished)


def _write_queued(
    key: Key, changes: list[StatusChange], tracker: JobTracker, indexes: Indexes
) -> None:
    def in_order(status: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        for change in changes:
            status = change(status, state)
        return status

    try:
        write_status(key, tracker, indexes, in_order)
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
        tracker.quiet_until[key] = now + settings.progress_backoff
        return
    tracker.quiet_until.pop(key, None)
    refresh(key, tracker, indexes, progress)


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
