"""Kubernetes Events, posted best effort behind a rate limit.

Events are for people reading `kubectl describe`; status is what counts. When a thousand
FineTuneJobs arrive at once their "Created" and "Preparing" Events would be a third of the
operator's API requests while the API server is busiest creating their Jobs. Like client-go's
event broadcaster, Events here wait in a bounded backlog (dropped and counted when it is full)
and are posted at a steady rate, so the burst's Events are posted after the burst's Jobs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sectune_operator import metrics

EVENTS_PER_SECOND = 20.0
"""Steady rate of Events posted (client-go's default client allows 5 requests/s in all)."""
EVENT_BURST = 50
"""Events posted at once before the rate applies: a few jobs' Events are never delayed."""
EVENT_BACKLOG = 10_000
"""Events waiting at most; more are dropped (and counted) rather than held in memory."""
POSTERS = 4
LOGGER = logging.getLogger(__name__)

Post = Callable[[dict[str, Any], str, str, str], None]


class TokenBucket:
    """`take` returns how long to wait before acting: `burst` actions at once, then `rate` a
    second. Thread-safe; the clock is injectable for tests."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1  # may go negative: a debt later takers wait behind
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class EventPoster:
    """Post Events through `post` from `posters` threads, at most `rate` a second after a
    `burst`, holding at most `backlog` waiting ones."""

    def __init__(
        self,
        post: Post,
        *,
        rate: float = EVENTS_PER_SECOND,
        burst: int = EVENT_BURST,
        backlog: int = EVENT_BACKLOG,
        posters: int = POSTERS,
    ) -> None:
        self._post = post
        self._bucket = TokenBucket(rate, burst)
        self._waiting: queue.Queue[tuple[dict[str, Any], str, str, str]] = queue.Queue(backlog)
        self._posters = posters
        self._started = False
        self._start_lock = threading.Lock()

    def submit(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> bool:
        """Queue an Event; False (and counted) when the backlog is full."""
        self._start()
        try:
            self._waiting.put_nowait((involved, type_, reason, message))
        except queue.Full:
            metrics.EVENTS_DROPPED.inc()
            return False
        return True

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            for i in range(self._posters):
                threading.Thread(target=self._run, name=f"events-{i}", daemon=True).start()
            self._started = True

    def _run(self) -> None:
        while True:
            involved, type_, reason, message = self._waiting.get()
            time.sleep(self._bucket.take())
            try:
                self._post(involved, type_, reason, message)
            except Exception as exc:  # an Event lost is logged; status is what counts
                LOGGER.warning(f"Event {reason} for {involved['metadata']['name']}: {exc}")
