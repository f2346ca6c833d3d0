"""What the operator remembers of FineTuneJobs between events, shared by every handler thread
and the progress poller (one instance, made at startup, kept in kopf's memo).

kopf gives each handler the indexes of FineTuneJobs, Jobs and Pods; the tracker adds what the
indexes cannot hold: the status last written (ahead of the watch), pods seen (a preempted pod
is gone from the index but still counts as an attempt), one lock per job, and which jobs are
training now (the only ones whose progress is read).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
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


@dataclass
class JobTracker:
    pods_seen: dict[Key, set[str]] = field(default_factory=dict)
    written: dict[Key, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """The status each job was last patched to, with the resourceVersion the patch returned."""
    quiet_until: dict[Key, float] = field(default_factory=dict)
    """Monotonic time before which a trainer that did not answer is not asked again."""
    indexes: Indexes | None = None
    """Set by the first handler that runs; the poller reads through it."""
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
