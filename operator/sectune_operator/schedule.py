"""FineTuneSchedule decisions, as CronJob's controller makes them: when a run is due, what a run
is named, which finished runs the history limits drop, and the drift query. Pure functions."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from cronsim import CronSim

from sectune_operator.canary import DRIFT_SCORES

SCHEDULE_LABEL = "sectune.io/finetuneschedule"
MAX_SCHEDULE_NAME = 42
"""A run is `<schedule>-<minutes since the epoch>` (at most 9 digits) within a FineTuneJob's
52 characters."""


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def next_time(cron: str, time_zone: str, after: dt.datetime) -> dt.datetime:
    """The first scheduled time strictly after `after`."""
    local = after.astimezone(ZoneInfo(time_zone))
    return next(CronSim(cron, local)).astimezone(dt.UTC)


def due(cron: str, time_zone: str, last: dt.datetime, now: dt.datetime) -> dt.datetime | None:
    """The latest scheduled time in (last, now], or None. Missed earlier times are not run
    (no backfill: one run for the most recent)."""
    found = None
    moment = next_time(cron, time_zone, last)
    while moment <= now:
        found = moment
        moment = next_time(cron, time_zone, moment)
    return found


TRIGGER_MARKS = {"drift": "d", "quality": "q"}
"""What a triggered run's name carries before its minute (a cron run: nothing)."""


def run_name(schedule: str, when: dt.datetime, trigger: str = "cron") -> str:
    """Deterministic, so a restarted operator creates the same run, not a second one."""
    minutes = int(when.timestamp()) // 60
    return f"{schedule}-{TRIGGER_MARKS.get(trigger, '')}{minutes}"


@dataclass(frozen=True)
class Run:
    name: str
    phase: str | None
    created: str


def over_history(runs: list[Run], successful_limit: int, failed_limit: int) -> list[str]:
    """Finished runs beyond the history limits, oldest first."""
    drop: list[str] = []
    for phases, limit in (
        (("Succeeded",), successful_limit),
        (("Failed",), failed_limit),
    ):
        finished = sorted((r for r in runs if r.phase in phases), key=lambda r: r.created)
        drop += [r.name for r in finished[: max(0, len(finished) - limit)]]
    return drop


def drift_query(selector: str, adapter: str, score: str, minutes: int) -> str:
    """PromQL: the lowest, over the last `minutes`, of the served version's highest drift
    score; above the threshold means it stayed above all that time (and it was there all that
    time)."""
    series = f'{{{selector},adapter="{adapter}",{DRIFT_SCORES[score]}}}'
    return _held("min", f"max({series})", minutes, 15)


def quality_query(namespace: str, adapter: str, min_verdicts: int, minutes: int) -> str:
    """PromQL: the highest, over the last `minutes`, of the adapter's lowest live macro-F1
    among versions in traffic with at least `min_verdicts` verdicts in the day (the chart's
    recording rules); below the bound means it stayed below all that time. A version no
    longer served (its verdicts stay in the day's window) or at traffic 0 (a shadow, a
    standby) does not count: it is not what a new run would replace."""
    where = f'namespace="{namespace}",adapter="{adapter}"'
    judged = (
        f"sectune:serve_live_macro_f1:1d{{{where}}} and on (namespace, adapter, version) "
        f"(sectune:serve_verdicts:sum1d{{{where}}} >= {min_verdicts}) "
        f'and on (namespace, adapter, version) sectune_serve_adapter_info{{{where},traffic!="0"}}'
    )
    return _held("max", f"min({judged})", minutes, 60)


def _held(extreme: str, expr: str, minutes: int, step_seconds: int) -> str:
    """PromQL: the `extreme` (min or max) of `expr` over the last `minutes`, at steps of
    `step_seconds`, and nothing unless it had a value at every step: a series that appeared a
    minute ago has not stayed anywhere for an hour."""
    window = f"({expr})[{minutes}m:{step_seconds}s]"
    steps = minutes * 60 // step_seconds
    return f"{extreme}_over_time({window}) and count_over_time({window}) >= {steps}"
