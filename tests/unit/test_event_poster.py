"""Events are posted best effort: a burst at once, then a steady rate, a full backlog dropped
and counted; a failed post does not stop the ones after it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from sectune_operator import metrics
from sectune_operator.events import EventPoster, TokenBucket

JOB = {"apiVersion": "sectune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "a"}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_at_once_and_the_rest_waits_its_turn_at_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert [bucket.take() for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    clock.now += 10.0  # idle for a while: the burst is back, never more
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0


def test_events_beyond_the_backlog_are_dropped_and_counted_not_held():
    gate = threading.Event()
    posted: list[str] = []

    def post(involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        gate.wait(5)
        posted.append(reason)

    poster = EventPoster(post, rate=1000.0, burst=1000, backlog=2, posters=1)
    before = metrics.EVENTS_DROPPED._value.get()
    accepted = [poster.submit(JOB, "Normal", f"E{i}", "m") for i in range(6)]
    # one is being posted (the poster blocks on the gate), two wait, the rest are dropped
    assert accepted.count(False) >= 3
    assert metrics.EVENTS_DROPPED._value.get() - before == accepted.count(False)
    gate.set()
    for _ in range(100):
        if len(posted) == accepted.count(True):
            break
        time.sleep(0.05)
    assert posted == [f"E{i}" for i, ok in enumerate(accepted) if ok]


def test_a_failed_post_is_logged_and_the_next_event_is_still_posted(caplog):
    posted: list[str] = []
    done = threading.Event()

    def post(involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        if reason == "Bad":
            raise RuntimeError("403 Forbidden")
        posted.append(reason)
        done.set()

    poster = EventPoster(post, posters=1)
    poster.submit(JOB, "Normal", "Bad", "m")
    poster.submit(JOB, "Normal", "Good", "m")
    assert done.wait(5)
    assert posted == ["Good"]
    assert "Event Bad for a: 403 Forbidden" in caplog.text
