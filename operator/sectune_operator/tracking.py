"""What the operator remembers of FineTuneJobs between events, shared by every handler thread
and the progress poller (one instance, made at startup, kept in kopf's memo).

kopf gives each handler the indexes of FineTuneJobs, Jobs and Pods; the tracker adds what the
indexes cannot hold: the status last written (ahead of the watch), the status changes waiting
to be written, pods seen (a preempted pod is gone from the index but still counts as an
attempt), one lock per job, and which jobs are training now (the only ones whose progress is
read).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sectune_operator.status import ACTIVE

Key = tuple[str, str]
"""(namespace, FineTuneJob name)"""


@dataclass(frozen=True)
class Indexes:
    """kopf's live indexes, keyed by (namespace, FineTuneJob name)."""

    states: Mapping[Key, Any]
    jobs: Mapping[Key, Any]
    pods: Mapping[Key, Any]


StatusChange = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
"""(status now, the job's index entry) -> the status it should have."""

COALESCE_SECONDS = 1.0
"""How long a job's first status change waits for others before all are written as one patch.
A new job's Job, pod, scheduling and start arrive within a second or two: one patch instead of
four, and "pod finished → Succeeded" stays about a second."""


class StatusQueue:
    """Status changes waiting to be written, per job. Changes to one job that arrive within
    `delay` of its first are written together (applied in order, one patch); an urgent change
    (the trainer finished) is due at once and taken before the others. A job is handed to one
    writer at a time, so its changes are never applied out of order."""

    def __init__(self, delay: float = COALESCE_SECONDS) -> None:
        self.delay = delay
        # key -> (due, urgent, changes)
        self._pending: dict[Key, tuple[float, bool, list[StatusChange]]] = {}
        self._writing: set[Key] = set()
        self._changed = threading.Condition()

    def put(
        self, key: Key, change: StatusChange, *, urgent: bool = False, now: float | None = None
    ) -> None:
        now = time.monotonic() if now is None else now
        with self._changed:
            due, was_urgent, changes = self._pending.get(key, (now + self.delay, False, []))
            if urgent:
                due = min(due, now)
            self._pending[key] = (due, urgent or was_urgent, [*changes, change])
            self._changed.notify()

    def retry(self, key: Key, changes: list[StatusChange], after: float) -> None:
        """A write failed: its changes go before any that arrived since, `after` seconds on."""
        with self._changed:
            _, urgent, newer = self._pending.get(key, (0.0, False, []))
            self._pending[key] = (time.monotonic() + after, urgent, [*changes, *newer])
            self._changed.notify()

    def due(self, now: float, capacity: int | None = None) -> list[tuple[Key, list[StatusChange]]]:
        """Take the jobs whose changes are due and not being written, urgent ones first, so
        that at most `capacity` jobs are being written at once; they are being written until
        `done`."""
        with self._changed:
            ready = sorted(
                (not urgent, when, key)
                for key, (when, urgent, _) in self._pending.items()
                if when <= now and key not in self._writing
            )
            if capacity is not None:
                ready = ready[: max(0, capacity - len(self._writing))]
            keys = [key for _, _, key in ready]
            self._writing.update(keys)
            return [(key, self._pending.pop(key)[2]) for key in keys]

    def done(self, key: Key) -> None:
        with self._changed:
            self._writing.discard(key)
            self._changed.notify()

    def wait(self, timeout: float, capacity: int | None = None) -> None:
        """Sleep until the next change is due (while fewer than `capacity` jobs are being
        written), something new arrives, a write finishes, or `timeout`."""
        with self._changed:
            if capacity is None or len(self._writing) < capacity:
                waiting = [
                    w for key, (w, _, _) in self._pending.items() if key not in self._writing
                ]
                if waiting:
                    timeout = min(timeout, max(0.0, min(waiting) - time.monotonic()))
            if timeout > 0:
                self._changed.wait(timeout)

    def __len__(self) -> int:
        with self._changed:
            return len(self._pending)


@dataclass
class JobTracker:
    pods_seen: dict[Key, set[str]] = field(default_factory=dict)
    written: dict[Key, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """The status each job was last patched to, with the resourceVersion the patch returned."""
    quiet_until: dict[Key, float] = field(default_factory=dict)
    """Monotonic time before which a trainer that did not answer is not asked again."""
    statuses: StatusQueue = field(default_factory=StatusQueue)
    secrets_found: dict[tuple[str, str], float] = field(default_factory=dict)
    """(namespace, Secret name) -> monotonic time it was last found to exist."""
    indexes: Indexes | None = None
    """Set by the first handler that runs; the poller and the status writer read through it."""
    _locks: dict[Key, threading.Lock] = field(default_factory=dict)
    _active: set[Key] = field(default_factory=set)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, key: Key) -> threading.Lock:
        """One lock per job: writes to one job are serial, different jobs run in parallel."""
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def saw_pod(self, key: Key, uid: str) -> None:
        with self._guard:
            self.pods_seen.setdefault(key, set()).add(uid)

    def pods_started(self, key: Key) -> int:
        with self._guard:
            return len(self.pods_seen.get(key, ()))

    def secret_found_recently(self, secret: tuple[str, str], ttl: float) -> bool:
        with self._guard:
            return time.monotonic() - self.secrets_found.get(secret, -ttl) < ttl

    def found_secret(self, secret: tuple[str, str]) -> None:
        with self._guard:
            self.secrets_found[secret] = time.monotonic()

    def set_phase(self, key: Key, phase: str | None) -> None:
        with self._guard:
            if phase in ACTIVE:
                self._active.add(key)
            else:
                self._active.discard(key)

    def active(self) -> list[Key]:
        """Jobs whose trainer runs now."""
        with self._guard:
            return sorted(self._active)

    def forget(self, key: Key) -> None:
        """The FineTuneJob is gone."""
        with self._guard:
            for table in (self.pods_seen, self.written, self.quiet_until, self._locks):
                table.pop(key, None)
            self._active.discard(key)
