"""The shipped dashboards' queries, as Grafana sends them with every variable on "All"."""

from __future__ import annotations

import json


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
