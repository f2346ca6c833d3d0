"""Grafana dashboards as code: Operator, Training and Serving, built with Grafana's own typed
builder (grafana-foundation-sdk) and written into the chart, like the CRDs.

    python -m sectune_operator.dashboards            # make dashboards
    python -m sectune_operator.dashboards --check    # fail if the chart's files differ

Every query selects on the `namespace` and `pod` labels the chart's PodMonitors keep, names only
metrics the code exports (tests/unit/test_monitoring.py), and the Serving queries are run
against a real Prometheus after real traffic in e2e.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from sectune_operator.generated import write_or_check

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "charts" / "sectune" / "files" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
NS = 'namespace=~"$namespace"'


def events(metric: str, by: str, window: str = "1h", selector: str = NS) -> str:
    """How often a labelled counter counted in the window, per `by`, including its first
    event: such a counter has no series before it, so a series new within the window counts
    whole (increase() alone sees 1 -> 1, 0). `+ 0` drops the metric name so that `or` matches
    the two sides on their labels alone."""
    series = f"{metric}{{{selector}}}"
    new = f"(({series} unless {series} offset {window}) + 0)"
    return f"sum by ({by}) ({new} or increase({series}[{window}]))"


def _query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _series(
    title: str,
    description: str,
    queries: list[tuple[str, str]],
    unit: str = "short",
    width: int = 12,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
    )
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + index)))
    return panel


def _stat(title: str, description: str, expr: str, legend: str, unit: str = "short") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(6)
        .height(5)
        .with_target(_query(expr, legend))
    )


def _dashboard(uid: str, title: str, description: str, metric: str) -> dash.Dashboard:
    """A dashboard with the datasource and namespace variables."""
    return (
        dash.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["sectune"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dash.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .with_variable(
            dash.QueryVariable("namespace")
            .label("Namespace")
            .datasource(DATASOURCE)
            .query(f"label_values({metric}, namespace)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
    )


def operator_dashboard() -> dash.Dashboard:
    return (
        _dashboard(
            "sectune-operator",
            "sectune / Operator",
            "FineTuneJobs by phase, reconcile latency and errors, rendered revisions, rollbacks.",
            "sectune_operator_finetunejobs",
        )
        .with_row(dash.Row("Jobs"))
        .with_panel(
            _series(
                "FineTuneJobs by phase",
                "How many FineTuneJobs are in each phase.",
                [(f"sum by (phase) (sectune_operator_finetunejobs{{{NS}}})", "{{phase}}")],
            )
        )
        .with_panel(
            _series(
                "Failures and failed gates",
                "FineTuneJobs that ended Failed (by reason) and adapters that failed their gates.",
                [
                    (
                        events("sectune_operator_finetunejob_failures_total", "reason"),
                        "failed: {{reason}}",
                    ),
                    (events("sectune_operator_gate_failures_total", ""), "gates failed"),
                ],
            )
        )
        .with_row(dash.Row("Reconciliation"))
        .with_panel(
            _series(
                "Reconcile latency",
                "Time to reconcile a FineTuneJob or AdapterDeployment: p50 and p95.",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) (rate("
                        f"sectune_operator_reconcile_duration_seconds_bucket[{RATE}])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le) (rate("
                        f"sectune_operator_reconcile_duration_seconds_bucket[{RATE}])))",
                        "p95",
                    ),
                ],
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Reconcile errors and API retries",
                "Errors by reason (user errors such as InvalidSpec included) and Kubernetes API "
                "calls retried after a server error or throttling.",
                [
                    (
                        f"sum by (reason) (rate(sectune_operator_reconcile_errors_total[{RATE}]))",
                        "error: {{reason}}",
                    ),
                    (
                        f"sum by (operation) (rate(sectune_operator_api_retries_total[{RATE}]))",
                        "retry: {{operation}}",
                    ),
                ],
                unit="ops",
            )
        )
        .with_panel(
            _series(
                "Serving revisions and canary rollbacks",
                "Adapter sets rendered for AdapterDeployments, and canaries rolled back.",
                [
                    (
                        events("sectune_operator_serving_revisions_total", "namespace"),
                        "revisions {{namespace}}",
                    ),
                    (
                        events("sectune_operator_canary_rollbacks_total", "namespace, metric"),
                        "rollback {{namespace}} ({{metric}})",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Training duration",
                "From a training Job's start to Succeeded or Failed: p50 and p95 of those that "
                "ended in the last 6 hours.",
                [
                    (
                        "histogram_quantile(0.5, sum by (le) (increase("
                        "sectune_operator_training_duration_seconds_bucket[6h])))",
                        "p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le) (increase("
                        "sectune_operator_training_duration_seconds_bucket[6h])))",
                        "p95",
                    ),
                ],
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Events not posted",
                "Kubernetes Events the operator dropped because too many were waiting (status "
                "was still written): above 0 means a burst outran the Event rate limit.",
                [
                    (
                        # the operator's own series: no tenant namespace to filter on
                        events("sectune_operator_events_dropped_total", "pod", selector=""),
                        "dropped ({{pod}})",
                    )
                ],
            )
        )
    )


def training_dashboard() -> dash.Dashboard:
    selector = f'{NS},finetunejob=~"$finetunejob",pod=~"$pod"'
    return (
        _dashboard(
            "sectune-training",
            "sectune / Training",
            "Live training: loss, tokens/s, progress and ETA per training pod.",
            "sectune_train_step",
        )
        .with_variable(
            dash.QueryVariable("finetunejob")
            .label("FineTuneJob")
            .datasource(DATASOURCE)
            .query(f"label_values(sectune_train_step{{{NS}}}, finetunejob)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_variable(
            dash.QueryVariable("pod")
            .label("Training pod")
            .datasource(DATASOURCE)
            .query(f'label_values(sectune_train_step{{{NS},finetunejob=~"$finetunejob"}}, pod)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_panel(
            _stat(
                "Progress",
                "Optimizer steps done, in percent of those planned.",
                f"100 * max by (pod) (sectune_train_step{{{selector}}}) / "
                f"max by (pod) (sectune_train_total_steps{{{selector}}})",
                "{{pod}}",
                unit="percent",
            )
        )
        .with_panel(
            _stat(
                "ETA",
                "Estimated time to the end of training.",
                f"max by (pod) (sectune_train_eta_seconds{{{selector}}})",
                "{{pod}}",
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Training loss",
                "Loss of the latest optimizer step.",
                [(f"max by (pod) (sectune_train_loss{{{selector}}})", "{{pod}}")],
            )
        )
        .with_panel(
            _series(
                "Tokens per second",
                "Training throughput since the start of the run.",
                [(f"max by (pod) (sectune_train_tokens_per_second{{{selector}}})", "{{pod}}")],
            )
        )
        .with_panel(
            _series(
                "Learning rate",
                "Learning rate of the latest step (warmup, then decay).",
                [(f"max by (pod) (sectune_train_learning_rate{{{selector}}})", "{{pod}}")],
            )
        )
    )


def serving_dashboard() -> dash.Dashboard:
    s = f'{NS},adapter=~"$adapter"'
    by = "adapter, version"
    return (
        _dashboard(
            "sectune-serving",
            "sectune / Serving",
            "Requests, latency and errors per adapter and version; label mix, confidence, "
            "drift against its threshold; canary and stable side by side.",
            "sectune_serve_requests_total",
        )
        .with_variable(
            dash.QueryVariable("adapter")
            .label("Adapter")
            .datasource(DATASOURCE)
            .query(f"label_values(sectune_serve_adapter_info{{{NS}}}, adapter)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_row(dash.Row("Traffic"))
        .with_panel(
            _series(
                "Requests per second",
                "Requests answered per adapter and version (all status codes).",
                [
                    (
                        f"sum by ({by}) (rate(sectune_serve_requests_total{{{s}}}[{RATE}]))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Latency p50 / p95 / p99",
                "Time from request to response per adapter and version. The alert fires above "
                "500 ms at p95.",
                [
                    (
                        f"histogram_quantile({q}, sum by ({by}, le) (rate("
                        f"sectune_serve_request_duration_seconds_bucket{{{s}}}[{RATE}])))",
                        f"p{int(q * 100)} {{{{adapter}}}}@{{{{version}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Error ratio (5xx)",
                "Share of requests answered 5xx per adapter and version.",
                [
                    (
                        f'sum by ({by}) (rate(sectune_serve_requests_total{{{s},code=~"5.."}}'
                        f"[{RATE}])) / sum by ({by}) (rate(sectune_serve_requests_total{{{s}}}"
                        f"[{RATE}]))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            _series(
                "Tokens per second",
                "Prompt and completion tokens processed.",
                [
                    (
                        f"sum by ({by}, kind) (rate(sectune_serve_tokens_total{{{s}}}[{RATE}]))",
                        "{{adapter}}@{{version}} {{kind}}",
                    )
                ],
            )
        )
        .with_row(dash.Row("Canary vs stable"))
        .with_panel(
            _series(
                "p95 latency by version",
                "Each version of the selected adapters side by side: a canary slower than its "
                "stable version shows here before canary analysis rolls it back.",
                [
                    (
                        f"histogram_quantile(0.95, sum by ({by}, le) (rate("
                        f"sectune_serve_request_duration_seconds_bucket{{{s}}}[{RATE}])))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="s",
            )
        )
        .with_panel(
            _series(
                "Traffic share by version",
                "The share of each adapter's requests the weighted split sent to each version "
                "(requests pinned with name@version are not counted), in percent.",
                [
                    (
                        f"100 * sum by ({by}) (rate(sectune_serve_requests_total{{{s},"
                        f'routing="traffic"}}[{RATE}])) / on (adapter) group_left sum by '
                        f'(adapter) (rate(sectune_serve_requests_total{{{s},routing="traffic"}}'
                        f"[{RATE}]))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="percent",
            )
        )
        .with_row(dash.Row("Quality"))
        .with_panel(
            _series(
                "Predicted label mix",
                "Labels predicted by /v1/classify per adapter and version.",
                [
                    (
                        f"sum by ({by}, label) (rate(sectune_serve_predictions_total{{{s}}}"
                        f"[{RATE}]))",
                        "{{adapter}}@{{version}} {{label}}",
                    )
                ],
                unit="reqps",
            )
        )
        .with_panel(
            _series(
                "Median confidence",
                "Median probability of the predicted label: a falling median is an early sign "
                "of inputs the adapter was not trained on.",
                [
                    (
                        f"histogram_quantile(0.5, sum by ({by}, le) (rate("
                        f"sectune_serve_confidence_bucket{{{s}}}[{RATE}])))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            _series(
                "Drift against its threshold",
                "Label drift (classification) and prompt-length drift (every task type) per "
                "version, with the deployment's threshold the alerts compare them with.",
                [
                    (
                        f"max by ({by}) (sectune_serve_drift_score{{{s}}})",
                        "labels {{adapter}}@{{version}}",
                    ),
                    (
                        f"max by ({by}) (sectune_serve_input_drift_score{{{s}}})",
                        "inputs {{adapter}}@{{version}}",
                    ),
                    (
                        f"max by ({by}) (sectune_serve_drift_threshold{{{s}}})",
                        "threshold {{adapter}}@{{version}}",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Refused versions",
                "Configured versions a server refused (integrity, gates-failed, base-model, …); "
                "it keeps serving the previous one.",
                [
                    (
                        f"max by ({by}, reason) (sectune_serve_adapter_refused{{{s}}})",
                        "{{adapter}}@{{version}} {{reason}}",
                    )
                ],
            )
        )
        .with_panel(
            _series(
                "Batch size",
                "Requests per forward pass (mixed adapters share a batch).",
                [
                    (
                        f"sum by (kind) (rate(sectune_serve_batch_size_sum{{{NS}}}[{RATE}])) / "
                        f"sum by (kind) (rate(sectune_serve_batch_size_count{{{NS}}}[{RATE}]))",
                        "{{kind}}",
                    )
                ],
            )
        )
        .with_panel(
            _series(
                "Adapter loads failed and config reloads",
                "Versions a server could not load in the last hour, by reason, and how its "
                "config reloads ended (applied, partial, invalid).",
                [
                    (
                        events("sectune_serve_adapter_load_failures_total", f"{by}, reason"),
                        "load failed {{adapter}}@{{version}} {{reason}}",
                    ),
                    (events("sectune_serve_config_reloads_total", "result"), "reload {{result}}"),
                ],
            )
        )
        .with_row(dash.Row("Live quality (analysts' verdicts, last day)"))
        .with_panel(
            _series(
                "Live macro-F1 against its evaluation",
                "Macro-F1 over the verdicts analysts posted in the last day (POST /v1/feedback) "
                "next to the version's offline macro-F1; SectuneLiveQualityDropped fires when the "
                "gap passes feedback.maxDrop with feedback.minVerdicts verdicts.",
                [
                    (
                        f"max by ({by}) (sectune:serve_live_macro_f1:1d{{{s}}})",
                        "live {{adapter}}@{{version}}",
                    ),
                    (
                        f"max by ({by}) (sectune_serve_offline_macro_f1{{{s}}})",
                        "offline {{adapter}}@{{version}}",
                    ),
                ],
            )
        )
        .with_panel(
            _series(
                "Live recall per label",
                "Of the alerts analysts say are each label, the share the version gave that "
                "label (last day): a missed class shows here first.",
                [
                    (
                        f"max by ({by}, label) (sectune:serve_live_recall:1d{{{s}}})",
                        "{{adapter}}@{{version}} {{label}}",
                    )
                ],
            )
        )
        .with_panel(
            _series(
                "Verdict coverage",
                "Verdicts in the last day per answer given in the last day: how much of what "
                "is served analysts judge.",
                [
                    (
                        f"sum by ({by}) (sectune:serve_verdicts:sum1d{{{s}}}) / sum by ({by}) "
                        f"(increase(sectune_serve_predictions_total{{{s}}}[1d]))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            _series(
                "Shadow agreement",
                "Share of a shadow version's background answers that agree with the answer the "
                "client got (its live macro-F1 on the same verdicts is in the first panel).",
                [
                    (
                        f'sum by ({by}) (rate(sectune_serve_shadow_answers_total{{{s},agree="true"}}'
                        f"[{RATE}])) / sum by ({by}) "
                        f"(rate(sectune_serve_shadow_answers_total{{{s}}}[{RATE}]))",
                        "{{adapter}}@{{version}}",
                    )
                ],
                unit="percentunit",
            )
        )
        .with_panel(
            table.Panel()
            .title("Confusion matrix (verdicts, last day)")
            .description(
                "Verdicts per predicted and actual label: the off-diagonal rows are what "
                "analysts corrected, and what the next training run learns from."
            )
            .datasource(DATASOURCE)
            .span(12)
            .height(8)
            .with_target(
                _query(
                    f"sum by ({by}, predicted, actual) "
                    f"(sectune:serve_verdicts:increase1d{{{s}}}) > 0",
                    "",
                )
                .instant()
                .format(PromQueryFormat.TABLE)
            )
        )
    )


def render_all() -> dict[str, str]:
    """File name -> JSON of every dashboard."""
    return {
        f"{board.build().uid}.json": json.dumps(
            board.build(), cls=JSONEncoder, indent=2, sort_keys=True
        )
        + "\n"
        for board in (operator_dashboard(), training_dashboard(), serving_dashboard())
    }


def queries(document: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a rendered dashboard (panels and variables)."""
    found = [
        target["expr"]
        for panel in document.get("panels", [])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args(argv)
    return write_or_check(
        render_all(),
        [DASHBOARD_DIR],
        args.check,
        "dashboards differ from the code (make dashboards)",
    )


if __name__ == "__main__":
    sys.exit(main())
