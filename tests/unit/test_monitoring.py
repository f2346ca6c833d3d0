"""The recording and alert rules the chart ships: promtool checks them, promtool unit tests prove
every alert fires when it should and stays silent when it should not (and the live-quality
records compute what scikit-learn does), and every metric they name is one the code exports or
a rule records."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from sectune.yamlio import dump_yaml, load_yaml
from support.monitoring import dashboard_queries, promtool_test
from support.processes import tool

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "sectune" / "files" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "rules.test.yaml"
METRIC = re.compile(r"\b(sectune_[a-z0-9_]+)\b")
RECORDED = re.compile(r"\b(sectune:[a-z0-9_]+:[a-z0-9]+)\b")


def exported_metrics() -> set[str]:
    """Every sample name the server, the operator and the trainer can export."""
    from sectune.serving.metrics import ServingMetrics
    from sectune_operator import metrics as operator_metrics

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names: set[str] = set()
    for registry in (ServingMetrics().registry, operator_metrics.REGISTRY):
        for family in registry.collect():
            names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    # The trainer's gauges (sectune.training.metrics) start an HTTP server when built: their
    # names come from the contract they are made from.
    from sectune.contract import PROGRESS_PREFIX, TrainingProgress

    names |= {PROGRESS_PREFIX + field for field in TrainingProgress.EXPORTED}
    return names


def rules() -> list[dict]:  # type: ignore[type-arg]
    return [rule for group in load_yaml(RULES.read_text())["groups"] for rule in group["rules"]]


def alerts() -> list[dict]:  # type: ignore[type-arg]
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def test_rules_pass_promtool_check():
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_every_alert_fires_and_stays_silent_as_its_unit_tests_say(tmp_path: Path):
    tests = load_yaml(RULE_TESTS.read_text())
    cases = [case for group in tests["tests"] for case in group["alert_rule_test"]]
    for rule in alerts():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no silent case"
    # Annotations are templates checked above; the unit tests judge expressions and labels.
    stripped = load_yaml(RULES.read_text())
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(dump_yaml(stripped))
    promtool_test(tmp_path, RULE_TESTS.read_text())


def test_rules_name_only_metrics_the_code_exports():
    exported, records = exported_metrics(), recorded()
    for rule in rules():
        named = rule.get("alert") or rule["record"]
        for name in METRIC.findall(rule["expr"]):
            assert name in exported, f"{named} queries {name}, which nothing exports"
        for name in RECORDED.findall(rule["expr"]):
            assert name in records, f"{named} queries {name}, which no rule records"


def test_every_alert_has_a_runbook():
    runbooks = (ROOT / "docs" / "monitoring.md").read_text()
    for rule in alerts():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert f"### {rule['alert']}" in runbooks and anchor == rule["alert"].lower()


def test_dashboards_in_the_chart_are_what_the_code_builds():
    from sectune_operator.dashboards import DASHBOARD_DIR, render_all

    rendered = render_all()
    assert sorted(rendered) == sorted(p.name for p in DASHBOARD_DIR.glob("*.json"))
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name}: run `make dashboards`"
    assert set(dashboard_queries()) == {"sectune-operator", "sectune-training", "sectune-serving"}


def test_dashboard_queries_parse_and_name_only_exported_metrics(tmp_path: Path):
    exported = exported_metrics()
    records = []
    for board, exprs in dashboard_queries().items():
        assert exprs, f"{board} has no queries"
        for index, expr in enumerate(exprs):
            for name in METRIC.findall(expr):
                assert name in exported, f"{board} queries {name}, which nothing exports"
            for name in RECORDED.findall(expr):
                assert name in recorded(), f"{board} queries {name}, which no rule records"
            records.append({"record": f"dashboard:{board.replace('-', '_')}:{index}", "expr": expr})
    # promtool parses every expression as a recording rule.
    (tmp_path / "dashboards.yaml").write_text(
        dump_yaml({"groups": [{"name": "dashboards", "rules": records}]})
    )
    checked = subprocess.run(
        [tool("promtool"), "check", "rules", str(tmp_path / "dashboards.yaml")],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
