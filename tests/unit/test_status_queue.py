"""The operator's status queue: a job's changes within a second become one patch, in order,
never written by two writers at once; a refused write is retried before newer changes."""

from __future__ import annotations

from typing import Any

from sectune_operator.tracking import StatusQueue

A = ("ns", "a")
B = ("ns", "b")


def _set(field: str, value: Any):
    def change(status: dict[str, Any], _state: dict[str, Any]) -> dict[str, Any]:
        return {**status, field: value}

    return change


def _apply(changes, status=None):
    status = status or {}
    for change in changes:
        status = change(status, {})
    return status


def test_changes_to_one_job_within_the_delay_are_taken_together_in_order():
    queue = StatusQueue(delay=1.0)
    queue.put(A, _set("phase", "Pending"), now=10.0)
    queue.put(A, _set("phase", "Preparing"), now=10.6)
    queue.put(B, _set("phase", "Pending"), now=10.8)

    assert queue.due(10.9) == []  # A's first change waits its full second
    taken = queue.due(11.0)
    assert [key for key, _ in taken] == [A]
    assert _apply(taken[0][1]) == {"phase": "Preparing"}
    assert len(queue) == 1  # B is still waiting
    assert [key for key, _ in queue.due(11.8)] == [B]


def test_a_job_being_written_is_not_handed_to_a_second_writer():
    queue = StatusQueue(delay=0.0)
    queue.put(A, _set("phase", "Pending"), now=0.0)
    assert [key for key, _ in queue.due(0.0)] == [A]
    queue.put(A, _set("phase", "Training"), now=0.1)

    assert queue.due(5.0) == []  # the first write has not finished
    queue.done(A)
    taken = queue.due(5.0)
    assert [key for key, _ in taken] == [A]
    assert _apply(taken[0][1]) == {"phase": "Training"}


def test_a_failed_write_is_retried_before_changes_that_came_after_it():
    queue = StatusQueue(delay=0.0)
    queue.put(A, _set("phase", "Pending"), now=0.0)
    ((_, failed),) = queue.due(0.0)
    queue.put(A, _set("phase", "Training"), now=0.5)
    queue.retry(A, failed, after=0.0)
    queue.done(A)

    ((_, changes),) = queue.due(1e12)
    assert _apply(changes) == {"phase": "Training"}
    assert len(changes) == 2


def test_a_finished_trainer_is_written_at_once_and_before_waiting_jobs():
    queue = StatusQueue(delay=1.0)
    queue.put(A, _set("phase", "Preparing"), now=0.0)
    queue.put(B, _set("phase", "Preparing"), now=0.5)
    queue.put(B, _set("phase", "Succeeded"), urgent=True, now=1.2)

    # A has waited its second too, but B's trainer finished: B goes first.
    taken = queue.due(1.2, capacity=1)
    assert [key for key, _ in taken] == [B]
    assert _apply(taken[0][1]) == {"phase": "Succeeded"}
    assert queue.due(1.2, capacity=1) == []  # the one writer is busy with B
    queue.done(B)
    assert [key for key, _ in queue.due(1.2, capacity=1)] == [A]
