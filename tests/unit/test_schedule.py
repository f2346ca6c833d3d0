"""FineTuneSchedule decisions: due times, run names, history limits, the drift query, and the
spec's refusals."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from sectune_operator import schedule
from sectune_operator.api import FineTuneScheduleSpec

UTC = dt.UTC
TEMPLATE = {
    "baseModel": {"uri": "s3://m/b"},
    "dataset": {"train": "s3://d/t.jsonl"},
    "task": {"labels": ["a", "b"]},
    "output": {"uri": "s3://o"},
}


def test_only_the_latest_missed_time_runs_and_time_zones_count():
    last = dt.datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    now = dt.datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
    # Daily at 03:00 Berlin (02:00 UTC in winter): many missed, one run for the latest.
    assert schedule.due("0 3 * * *", "Europe/Berlin", last, now) == dt.datetime(
        2026, 11, 25, 2, 0, tzinfo=UTC
    )
    assert schedule.due("0 3 1 12 *", "UTC", last, now) is None
    assert schedule.next_time("0 3 1 * *", "UTC", now) == dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


def test_run_names_are_deterministic_and_fit_a_job_name():
    when = dt.datetime(2026, 11, 25, 10, 31, 59, tzinfo=UTC)
    name = schedule.run_name("x" * schedule.MAX_SCHEDULE_NAME, when)
    assert name == schedule.run_name("x" * schedule.MAX_SCHEDULE_NAME, when.replace(second=0))
    assert len(name) <= 52
    assert schedule.run_name("s", when, "drift").startswith("s-d")


def test_history_limits_drop_the_oldest_finished_runs():
    runs = [
        schedule.Run("a", "Succeeded", "2026-11-01T00:00:00Z"),
        schedule.Run("b", "Succeeded", "2026-11-02T00:00:00Z"),
        schedule.Run("c", "Failed", "2026-11-03T00:00:00Z"),
        schedule.Run("d", "Failed", "2026-11-04T00:00:00Z"),
        schedule.Run("e", "Training", "2026-11-05T00:00:00Z"),
    ]
    assert schedule.over_history(runs, successful_limit=1, failed_limit=1) == ["a", "c"]
    assert schedule.over_history(runs, successful_limit=3, failed_limit=0) == ["c", "d"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "set schedule, driftTrigger, qualityTrigger, or more than one"),
        ({"schedule": "every day"}, "schedule 'every day'"),
        ({"schedule": "0 3 * * *", "timeZone": "Mars/Olympus"}, "not an IANA time zone"),
        ({"schedule": "0 3 * * *", "concurrencyPolicy": "Allow"}, "concurrencyPolicy"),
    ],
)
def test_bad_schedules_are_refused(spec, message):
    with pytest.raises(ValidationError, match=message):
        FineTuneScheduleSpec.model_validate({"jobTemplate": TEMPLATE, **spec})


def test_a_schedule_counts_as_its_runs_only_the_jobs_it_controls():
    """A tenant's FineTuneJob that merely carries the schedule's label is not a run: the
    schedule never deletes it for the history limit nor promotes it."""
    from sectune_operator.handlers.finetuneschedule import runs_by_schedule

    label = {schedule.SCHEDULE_LABEL: "nightly"}
    owned = {
        "ownerReferences": [
            {"kind": "FineTuneSchedule", "name": "nightly", "uid": "u-1", "controller": True}
        ]
    }
    run = runs_by_schedule("soc", "nightly-1", label, owned, {"phase": "Succeeded"})
    assert run[("soc", "nightly")]["ownerUid"] == "u-1"
    assert runs_by_schedule("soc", "mine", label, {}, {"phase": "Succeeded"}) == {}
    foreign = {"ownerReferences": [{**owned["ownerReferences"][0], "name": "other"}]}
    assert runs_by_schedule("soc", "mine", label, foreign, {}) == {}


class _Deployments:
    """What the API server holds: one AdapterDeployment, or none (404)."""

    def __init__(self, body: dict | None) -> None:
        self.body = body

    def get_namespaced_custom_object(self, *_: str) -> dict:
        from kubernetes.client.rest import ApiException

        if self.body is None:
            raise ApiException(status=404, reason="Not Found")
        return self.body


def test_a_run_is_compared_with_the_stable_version_its_deployment_serves(monkeypatch):
    """The stable version (the first on a 50/50 tie) as its servers verified it, whatever the
    order they report in; the schedule's last successful run only when nothing is served."""
    from sectune_operator.handlers import finetuneschedule

    spec = FineTuneScheduleSpec.model_validate(
        {
            "jobTemplate": TEMPLATE,
            "qualityTrigger": {"adapterDeployment": "soc", "adapter": "triage", "minMacroF1": 0.7},
        }
    )
    versions = [{"version": "v1", "traffic": 50}, {"version": "v2", "traffic": 50}]
    served = [
        {"name": "triage", "version": "v2", "uri": "s3://a/v2", "sha256": "2" * 64, "traffic": 50},
        {"name": "other", "version": "v1", "uri": "s3://o/v1", "sha256": "0" * 64},
        {"name": "triage", "version": "v1", "uri": "s3://a/v1", "sha256": "1" * 64, "traffic": 50},
    ]
    deployment = {
        "spec": {"adapters": [{"name": "triage", "versions": versions}]},
        "status": {"activeAdapters": served},
    }
    last = {
        "lastSuccessfulJob": {"name": "run-7", "adapter": {"uri": "s3://a/r7", "sha256": "7" * 64}}
    }

    def previous(body: dict | None, status: dict) -> tuple[str, str, str] | None:
        monkeypatch.setattr(finetuneschedule, "_custom", lambda: _Deployments(body))
        found = finetuneschedule._previous(spec, "ns", status)
        return None if found is None else (found.uri, found.sha256, found.what)

    assert previous(deployment, last) == ("s3://a/v1", "1" * 64, "served by soc: triage@v1")
    nothing_served = {**deployment, "status": {}}
    assert previous(nothing_served, last) == (
        "s3://a/r7",
        "7" * 64,
        "the last successful run: run-7",
    )
    assert previous(None, last)[2] == "the last successful run: run-7"
    assert previous(nothing_served, {}) is None
