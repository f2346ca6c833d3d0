"""The PromQL the operator asks (canary analysis, a schedule's drift trigger), evaluated by
Prometheus' own engine (promtool) on series shaped as the servers export them: the answers,
not the query strings, are what is checked."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from sectune.yamlio import dump_yaml
from sectune_operator import canary, schedule
from sectune_operator.settings import Settings
from support.monitoring import promtool_test

POD = "soc-serve-7d9f8b6c4-x2x9z"
NEIGHBOUR = "soc-serve-x-serve-5d4f8-abcde"  # an AdapterDeployment named soc-serve-x


def _selector() -> str:
    return Settings().prometheus_selector.format(namespace="soc", deployment="soc-serve")


def _series(name: str, values: str, pod: str = POD, **labels: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {"namespace": "soc", "pod": pod, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def _evaluate(tmp_path: Path, series: list[dict[str, str]], cases: list[dict[str, Any]]) -> None:
    """promtool evaluates each expression at its time and compares the samples."""
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}],
    }
    promtool_test(tmp_path, dump_yaml(tests))


def _at(expr: str, value: float | None, eval_time: str = "10m") -> dict[str, Any]:
    samples = [] if value is None else [{"labels": "{}", "value": value}]
    return {"expr": expr, "eval_time": eval_time, "exp_samples": samples}


def test_canary_figures_count_only_what_the_version_caused(tmp_path):
    """Over 10 minutes the canary got 200 requests from the traffic split, 5 of which the
    model failed (500); 30 more were shed under load (503), and a caller pinned 100 requests
    to it that all failed. A neighbouring deployment's pods fail everything. The canary's
    error rate is 5 / 235 of what the split sent (the 503s count as requests), nothing else."""
    version = {"adapter": "triage", "version": "v2"}
    requests = "sectune_serve_requests_total"
    series = [
        _series(requests, "0+20x10", code="200", endpoint="classify", routing="traffic", **version),
        _series(requests, "0+0.5x10", code="500", endpoint="classify", routing="traffic", **version),
        _series(requests, "0+3x10", code="503", endpoint="classify", routing="traffic", **version),
        _series(requests, "0+10x10", code="500", endpoint="classify", routing="pinned", **version),
        _series(
            requests, "0+50x10", NEIGHBOUR, code="500", endpoint="classify", routing="traffic",
            **version,
        ),
    ]  # fmt: skip
    asked = canary.queries(_selector(), "triage", "v2", 10)
    _evaluate(
        tmp_path,
        series,
        [_at(asked["requests"], 235.0), _at(asked["errors"], 5.0)],
    )


def test_canary_latency_is_classify_traffic_only(tmp_path):
    """Classify answers in 50 ms; pinned long generations take 20 s. p95 stays under 0.1 s."""
    bucket = "sectune_serve_request_duration_seconds_bucket"
    version = {"adapter": "triage", "version": "v2"}
    series = []
    for le, classify, generation in (("0.05", "0+10x10", "0x10"), ("0.1", "0+10x10", "0x10")):
        series.append(
            _series(bucket, classify, le=le, endpoint="classify", routing="traffic", **version)
        )
        series.append(
            _series(bucket, generation, le=le, endpoint="chat", routing="pinned", **version)
        )
    for le in ("30", "+Inf"):
        series.append(
            _series(bucket, "0+10x10", le=le, endpoint="classify", routing="traffic", **version)
        )
        series.append(
            _series(bucket, "0+10x10", le=le, endpoint="chat", routing="pinned", **version)
        )
    asked = canary.queries(_selector(), "triage", "v2", 10)
    # every classify answer is in the first bucket: interpolated, 0.95 of 0.05 s
    _evaluate(tmp_path, series, [_at(f"round(10000 * {asked['latency_p95']})", 475.0)])


@pytest.mark.parametrize(("score", "expected"), [("labels", 0.1), ("inputs", 0.9), ("any", 0.9)])
def test_drift_takes_the_highest_score_not_the_first_that_exists(tmp_path, score, expected):
    """Label drift 0.1, input drift 0.9: `any` is 0.9 for the canary and the schedule alike."""
    version = {"adapter": "triage", "version": "v2"}
    series = [
        _series("sectune_serve_drift_score", "0.1x40", **version),
        _series("sectune_serve_input_drift_score", "0.9x40", **version),
    ]
    cases = [_at(schedule.drift_query(_selector(), "triage", score, 30), expected, "40m")]
    # "Stayed above for 30m" needs 30 minutes of it: at 20m there are 20, and no answer.
    cases.append(_at(schedule.drift_query(_selector(), "triage", score, 30), None, "20m"))
    if score == "any":
        cases.append(_at(canary.queries(_selector(), "triage", "v2", 10)["drift"], 0.9, "40m"))
    _evaluate(tmp_path, series, cases)


def test_dashboard_event_counts_include_a_counters_first_event(tmp_path):
    """The Operator dashboard's failure, revision and rollback panels: a counter that appears
    at 1 counts 1 (increase() alone says 0); one older than the window that went 3 -> 5
    counts 2."""
    from sectune_operator.dashboards import events

    rollbacks = "sectune_operator_canary_rollbacks_total"
    series = [
        _series(rollbacks, "_x70 1x10", "sectune-7d9f8b6c4-aaaaa", metric="errorRate"),
        _series(rollbacks, "3x70 5x10", "sectune-7d9f8b6c4-bbbbb", metric="drift"),
    ]
    expr = events(rollbacks, "namespace, metric").replace("$namespace", ".*")
    cases = [
        {
            "expr": expr,
            "eval_time": "80m",
            "exp_samples": [
                {"labels": '{namespace="soc",metric="errorRate"}', "value": 1},
                {"labels": '{namespace="soc",metric="drift"}', "value": 2},
            ],
        }
    ]
    _evaluate(tmp_path, series, cases)


def test_the_quality_trigger_reads_the_lowest_judged_version_through_the_charts_rules(tmp_path):
    """Verdicts as a server exports them, through the chart's own recording rules: v1 is right
    on all 60 verdicts (macro-F1 1.0), v2 right on 25 of 55 (F1 0.625 and 0, macro 0.3125), v3
    a shadow (traffic 0) wrong on all 60; the trigger's query reads 0.3125 — until v2 is no
    longer served (minute 41): then its verdicts, still in the day's window, stop counting."""
    import shutil

    rules = Path(__file__).resolve().parents[2] / "charts/sectune/files/prometheus/rules.yaml"
    shutil.copy(rules, tmp_path / "rules.yaml")

    def verdicts(version: str, predicted: str, actual: str, values: str) -> dict[str, str]:
        return _series(
            "sectune_serve_verdicts_total", values, adapter="triage", version=version,
            predicted=predicted, actual=actual, correct=str(predicted == actual).lower(),
        )  # fmt: skip

    def served(version: str, traffic: str, values: str) -> dict[str, str]:
        return _series("sectune_serve_adapter_info", values, adapter="triage", version=version,
                       sha256=version * 8, traffic=traffic)  # fmt: skip

    series = [
        verdicts("v1", "malicious", "malicious", "0 30x80"),
        verdicts("v1", "benign", "benign", "0 30x80"),
        verdicts("v2", "malicious", "malicious", "0 25x80"),
        verdicts("v2", "malicious", "benign", "0 30x80"),
        verdicts("v3", "malicious", "benign", "0 60x80"),
        served("v1", "90", "1x80"),
        served("v2", "10", "1x40 stale"),
        served("v3", "0", "1x80"),
    ]
    query = schedule.quality_query("soc", "triage", 50, 30)
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                # v2 is judged from minute 1 (55 verdicts): not yet 30 minutes of it at 29m.
                "promql_expr_test": [
                    _at(query, 0.3125, "40m"),
                    _at(query, 0.3125, "31m"),
                    _at(query, None, "29m"),
                    _at(query, 1.0, "75m"),  # v2 out of service since 41m: only v1 counts
                ],
            }
        ],
    }
    promtool_test(tmp_path, dump_yaml(tests))


def test_a_trigger_fires_on_its_own_side_of_the_bound():
    from sectune_operator.api import FineTuneScheduleSpec
    from sectune_operator.handlers.finetuneschedule import watches

    spec = FineTuneScheduleSpec.model_validate(
        {
            "jobTemplate": {
                "baseModel": {"uri": "hf://org/model@main"},
                "dataset": {"train": "s3://b/train.jsonl"},
                "task": {"type": "classification", "labels": ["benign", "malicious"]},
                "output": {"uri": "s3://b/out"},
            },
            "driftTrigger": {"adapterDeployment": "soc", "adapter": "triage", "threshold": 0.3},
            "qualityTrigger": {"adapterDeployment": "soc", "adapter": "triage", "minMacroF1": 0.7},
        }
    )
    drift, quality = watches(spec, "soc", Settings())
    assert (drift.fires(0.3), quality.fires(0.7), drift.fires(None), quality.fires(None)) == (
        None, None, None, None,
    )  # fmt: skip
    assert drift.fires(0.31) == "drift of soc/triage stayed above 0.3 for 60m (lowest 0.31)"
    assert quality.fires(0.69) == (
        "live macro-F1 of soc/triage stayed below 0.7 for 60m (highest 0.69)"
    )
    assert schedule.run_name("s", dt.datetime(2026, 12, 4, tzinfo=dt.UTC), "quality").startswith(
        "s-q"
    )


def test_canary_verdicts_count_a_new_series_whole_and_an_old_one_by_its_increase(tmp_path):
    """A canary pod's verdict counters appear during the window (counted whole); the stable
    version's went 40 -> 52 within it (counted 12)."""

    def verdicts(version: str, values: str, pod: str = POD) -> dict[str, str]:
        return _series(
            "sectune_serve_verdicts_total", values, pod, adapter="triage", version=version,
            predicted="malicious", actual="benign", correct="false",
        )  # fmt: skip

    series = [verdicts("v2", "_x50 7x10"), verdicts("v1", "40x50 52x10")]
    cases = [
        {
            "expr": canary.verdicts_query(_selector(), "triage", version, 30),
            "eval_time": "55m",
            "exp_samples": [{"labels": '{predicted="malicious",actual="benign"}', "value": value}],
        }
        for version, value in (("v2", 7), ("v1", 12))
    ]
    _evaluate(tmp_path, series, cases)


def _confusion(pairs: dict[tuple[str, str], int]) -> canary.Confusion:
    from collections import Counter

    return Counter(pairs)


def test_live_macro_f1_is_scikit_learns():
    import random

    from sklearn.metrics import f1_score

    rng = random.Random(7)
    labels = ["low", "medium", "high", "critical"]
    for _ in range(20):
        pairs = [(rng.choice(labels), rng.choice(labels[:3])) for _ in range(rng.randint(1, 60))]
        counts = _confusion({})
        counts.update(pairs)
        truth, predicted = [a for _, a in pairs], [p for p, _ in pairs]
        assert canary.macro_f1(counts) == pytest.approx(f1_score(truth, predicted, average="macro"))


def test_a_canary_is_rolled_back_on_verdicts_only_when_it_is_really_worse():
    from sectune_operator.api import RollbackSpec

    rollback = RollbackSpec(minVerdicts=30, maxMacroF1Drop=0.05)
    good = _confusion({("b", "b"): 45, ("m", "m"): 45, ("b", "m"): 5, ("m", "b"): 5})
    bad = _confusion({("b", "b"): 30, ("m", "m"): 30, ("b", "m"): 20, ("m", "b"): 20})
    breach, said = canary.judge_outcomes(good, bad, rollback)
    assert breach is not None and breach.metric == "liveMacroF1Drop"
    assert breach.value == pytest.approx(0.9 - 0.6)
    assert "live macro-F1 0.600 against stable 0.900" in said
    # The same rates on a tenth of the verdicts: too few to judge.
    few = _confusion({k: v // 10 for k, v in bad.items()})
    assert canary.judge_outcomes(good, few, rollback)[0] is None
    assert "(of 30 needed)" in canary.judge_outcomes(good, few, rollback)[1]
    # A small difference on a small sample is noise: no rollback though the drop passes 0.05.
    close = _confusion({("b", "b"): 22, ("m", "m"): 21, ("b", "m"): 4, ("m", "b"): 3})
    slightly = _confusion({("b", "b"): 20, ("m", "m"): 20, ("b", "m"): 5, ("m", "b"): 5})
    assert canary.macro_f1(close) - canary.macro_f1(slightly) > 0.05
    breach, said = canary.judge_outcomes(close, slightly, rollback)
    assert breach is None and "worse in" in said
    # A canary as good as the stable version is worse in about half of the resamples.
    assert 0.3 < canary.compare_outcomes(good, good).worse_share < 0.7
