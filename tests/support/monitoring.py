"""The shipped dashboards' queries, as Grafana sends them with every variable on "All"; and
promtool's unit tests run in Prometheus' own engine."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .processes import tool


def promtool_test(directory: Path, tests: str) -> None:
    """Run a promtool unit-test file's text in `directory` (where the rule files it names
    are); fail with promtool's own report."""
    (directory / "tests.yaml").write_text(tests)
    tested = subprocess.run(
        [tool("promtool"), "test", "rules", "tests.yaml"],
        capture_output=True,
        text=True,
        cwd=directory,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def dashboard_queries() -> dict[str, list[str]]:
    """Every dashboard's PromQL, with Grafana's variables filled in as Grafana would for "All"."""

    from sectune_operator.dashboards import DASHBOARD_DIR, queries

    filled = {}
    for path in sorted(DASHBOARD_DIR.glob("*.json")):
        document = json.loads(path.read_text())
        filled[path.stem] = [
            expr.replace("$__rate_interval", "5m")
            .replace("$namespace", ".*")
            .replace("$adapter", ".*")
            .replace("$pod", ".*")
            .replace("$finetunejob", ".*")
            for expr in queries(document)
        ]
    return filled


LIVE_QUALITY = (
    "sectune:serve_",
    "sectune_serve_offline_macro_f1",
    "sectune_serve_verdicts",
    "sectune_serve_shadow_answers",
)


def live_quality_query(expr: str) -> bool:
    """Whether a dashboard query reads analysts' verdicts or shadow answers (it has series only
    once verdicts were posted and a shadow served: tests/e2e/test_feedback_e2e.py runs those)."""
    return any(name in expr for name in LIVE_QUALITY)
