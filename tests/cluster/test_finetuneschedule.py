"""FineTuneSchedule on the real control plane, run by the operator as the chart's ServiceAccount:
cron runs on time under Forbid and Replace, suspend, history limits, no duplicate after a restart,
a drift trigger and a live-quality trigger fed by the real Prometheus (running the chart's
recording rules), and the optional promotion of a run whose gates
passed. Every schedule runs every minute, side by side, so the whole story takes two minutes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from support.kube import finish_job
from support.manifests import adapter_manifest
from support.processes import free_port, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

GROUP, VERSION = "sectune.io", "v1alpha1"
RULES = Path(__file__).resolve().parents[2] / "charts/sectune/files/prometheus/rules.yaml"
TEMPLATE = {
    "baseModel": {"uri": "s3://models/smollm2"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "task": {"labels": ["benign", "malicious"]},
    "resources": {"memory": "1Gi"},
    "output": {"uri": "s3://adapters/soc", "credentials": {"name": "storage"}},
}


def _schedule(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSchedule",
        "metadata": {"name": name},
        "spec": {"jobTemplate": TEMPLATE, **spec},
    }


def _runs(api_client: Any, namespace: str, schedule: str) -> list[str]:
    jobs = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "finetunejobs",
        label_selector=f"sectune.io/finetuneschedule={schedule}",
    )["items"]
    return sorted(j["metadata"]["name"] for j in jobs if not j["metadata"].get("deletionTimestamp"))


def _events(api_client: Any, namespace: str, name: str) -> list[tuple[str, str]]:
    events = client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [(e.reason, e.message) for e in events.items]


def _status(
    api_client: Any, namespace: str, name: str, plural: str = "finetuneschedules"
) -> dict[str, Any]:
    body = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, name
    )
    return body.get("status") or {}


def test_schedules_run_on_time_and_drift_starts_a_run(
    api_client, namespace, start_operator, prometheus
):
    custom = client.CustomObjectsApi(api_client)
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "storage"},
            "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
        },
    )
    # A served adapter whose prompt-length drift is high, as a server would export it.
    registry = CollectorRegistry()
    served = Gauge(
        "sectune_serve_adapter_info",
        "served",
        ["adapter", "version", "sha256", "traffic"],
        registry=registry,
    )
    served.labels("triage", "v1", "ab" * 32, "100").set(1)
    drift = Gauge(
        "sectune_serve_input_drift_score", "drift", ["adapter", "version"], registry=registry
    )
    drift.labels("triage", "v1").set(0.9)
    # ... and analysts who disagree with it: 10 of 70 verdicts right (live macro-F1 0.125/2).
    verdicts = Counter(
        "sectune_serve_verdicts",
        "verdicts",
        ["adapter", "version", "predicted", "actual", "correct"],
        registry=registry,
    )
    verdicts.labels("triage", "v1", "malicious", "malicious", "true").inc(10)
    verdicts.labels("triage", "v1", "malicious", "benign", "false").inc(60)
    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=registry)
    prometheus.start(
        [
            {
                "job_name": "server",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": namespace, "pod": "soc-serve-7d9f8b6c4-x2x9z"},
                    }
                ],
            }
        ],
        rule_files=[RULES],  # live macro-F1 is the chart's recording rules
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AdapterDeployment",
            "metadata": {"name": "soc"},
            "spec": {
                "baseModel": {"uri": "s3://models/smollm2"},
                "adapters": [{"name": "triage", "versions": [{"version": "v1", "source": {"uri": "s3://adapters/soc/t/versions/r1", "sha256": "ab" * 32}}]}],
            },
        },
    )  # fmt: skip
    every_minute = {"schedule": "* * * * *"}
    for body in (
        _schedule("forbid", **every_minute),
        _schedule("replace", **every_minute, concurrencyPolicy="Replace"),
        _schedule("paused", **every_minute, suspend=True),
        _schedule(
            "history",
            **every_minute,
            successfulJobsHistoryLimit=1,
            promote={"adapterDeployment": "soc", "adapter": "triage", "canaryPercent": 10},
            # "no worse than what came before": each run compared with the last success
            jobTemplate={
                **TEMPLATE,
                "evaluation": {
                    "gates": [{"metric": "accuracy", "overBaseline": "previous", "min": 0}]
                },
            },
        ),
        _schedule(
            "drifty",
            driftTrigger={
                "adapterDeployment": "soc",
                "adapter": "triage",
                "score": "inputs",
                "threshold": 0.3,
                "forMinutes": 1,
            },
        ),
        _schedule(
            "judged",
            qualityTrigger={
                "adapterDeployment": "soc",
                "adapter": "triage",
                "minMacroF1": 0.7,
                "minVerdicts": 50,
                "forMinutes": 1,
            },
        ),
    ):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuneschedules", body)
    env = {"SECTUNE_PROMETHEUS_URL": prometheus.url}
    operator = start_operator(env=env)

    # First minute: one run each (the suspended schedule none).
    wait_until(
        lambda: all(_runs(api_client, namespace, s) for s in ("forbid", "replace", "history")),
        75,
        "first runs",
    )
    first = {s: _runs(api_client, namespace, s) for s in ("forbid", "replace", "history")}
    assert all(len(runs) == 1 for runs in first.values()), first
    # A restart in the same minute creates no second run (names come from the scheduled minute).
    operator.stop()
    operator = start_operator(name="operator-restarted", env=env)
    time.sleep(5)
    assert {s: _runs(api_client, namespace, s) for s in first} == first
    status = _status(api_client, namespace, "forbid")
    assert (
        status["active"] == first["forbid"]
        and status["lastScheduleTime"]
        and status["nextScheduleTime"]
    )

    # The first history run has nothing before it: its previous-gates are left out, and it says so.
    [history_first] = first["history"]
    first_run = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", history_first
    )
    assert "previousVersion" not in first_run["spec"]["evaluation"]
    assert first_run["spec"]["evaluation"].get("gates", []) == []
    assert "sectune.io/previous-gates-skipped" in first_run["metadata"]["annotations"]

    # The history schedule's run passes its gates: it becomes a 10 % canary of soc/triage.
    finish_job(api_client, namespace, history_first, "cd" * 32)

    def promoted() -> dict[str, int]:
        spec = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "adapterdeployments", "soc"
        )["spec"]
        return {v["version"]: v.get("traffic", 100) for v in spec["adapters"][0]["versions"]}

    wait_until(lambda: promoted() == {"v1": 90, history_first: 10}, 30, "promoted as a canary")
    # The schedule's status is written by its own timer, after the promotion it records.
    wait_until(
        lambda: "lastSuccessfulJob" in _status(api_client, namespace, "history"),
        30,
        "the schedule's lastSuccessfulJob",
    )
    assert (
        _status(api_client, namespace, "history")["lastSuccessfulJob"]["adapter"]["sha256"]
        == "cd" * 32
    )

    # Second minute: Forbid skips (the first run still trains), Replace replaces, history runs again.
    wait_until(lambda: len(_runs(api_client, namespace, "history")) == 2, 75, "second history run")
    wait_until(
        lambda: _runs(api_client, namespace, "replace") != first["replace"], 30, "replaced run"
    )
    assert len(_runs(api_client, namespace, "replace")) == 1
    wait_until(
        lambda: any(r == "RunSkipped" for r, _ in _events(api_client, namespace, "forbid")),
        30,
        "Forbid skip",
    )
    assert _runs(api_client, namespace, "forbid") == first["forbid"]
    assert _runs(api_client, namespace, "paused") == []
    assert any(r == "RunReplaced" for r, _ in _events(api_client, namespace, "replace"))

    # The second history run succeeds: the limit of 1 drops the first; promotion waits while a
    # canary is in traffic.
    [history_second] = [r for r in _runs(api_client, namespace, "history") if r != history_first]
    # It is compared with the first, whose adapter the schedule put in as its previousVersion.
    second_run = custom.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", history_second
    )
    evaluation = second_run["spec"]["evaluation"]
    assert evaluation["previousVersion"]["sha256"] == "cd" * 32
    assert [g["overBaseline"] for g in evaluation["gates"]] == ["previous"]
    finish_job(api_client, namespace, history_second, "ef" * 32)
    wait_until(
        lambda: _runs(api_client, namespace, "history") == [history_second], 30, "history limit"
    )
    wait_until(
        lambda: any(r == "PromotionSkipped" for r, _ in _events(api_client, namespace, "history")),
        30,
        "promotion waits",
    )
    assert promoted() == {"v1": 90, history_first: 10}

    # Drift stayed above 0.3 for a minute in the real Prometheus: a run starts.
    wait_until(lambda: _runs(api_client, namespace, "drifty"), 120, "drift-triggered run")
    [run] = _runs(api_client, namespace, "drifty")
    assert run.startswith("drifty-d")
    [message] = [m for r, m in _events(api_client, namespace, "drifty") if r == "DriftTriggered"]
    assert "drift of soc/triage stayed above 0.3 for 1m" in message

    # Analysts' verdicts kept live macro-F1 below 0.7 for a minute: a run starts.
    wait_until(lambda: _runs(api_client, namespace, "judged"), 120, "quality-triggered run")
    [run] = _runs(api_client, namespace, "judged")
    assert run.startswith("judged-q")
    [message] = [m for r, m in _events(api_client, namespace, "judged") if r == "QualityTriggered"]
    assert "live macro-F1 of soc/triage stayed below 0.7 for 1m (highest 0.125)" in message


def test_promote_takes_a_succeeded_job_from_the_cluster_and_checks_storage(
    api_client, namespace, start_operator, control_plane, tmp_path
):
    """`sectune promote --job NS/NAME` reads the job's status with the user's kubeconfig, checks
    the stored manifest against the digest the job reported, and edits the file."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from sectune import artifacts, storage

    stage = tmp_path / "stage"
    (stage / "adapter").mkdir(parents=True)
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    prefix = storage.parse_uri(f"file://{tmp_path}/store/triage-v2")
    published = artifacts.publish(
        stage, prefix, "r2", adapter_manifest("triage-v2", "r2", gates_passed=True)
    )
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "storage"},
            "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
        },
    )
    start_operator()
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": "triage-v2"},
        "spec": TEMPLATE,
    }
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetunejobs", job
    )
    # The trainer's result names the stored version (file:// here, as `sectune run` writes it).
    core = client.CoreV1Api(api_client)
    wait_until(
        lambda: [
            p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"
        ],
        60,
        "pod",
    )
    [pod] = [p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"]
    result = {
        "phase": "Succeeded",
        "reason": "GatesPassed",
        "adapter": {"uri": published.uri, "sha256": published.manifest_sha256},
        "gates": [],
    }
    core.patch_namespaced_pod(
        pod.metadata.name, namespace,
        {"metadata": {"annotations": {"sectune.dev/test-exit-code": "0", "sectune.dev/test-termination-message": json.dumps(result)}}},
    )  # fmt: skip
    wait_until(
        lambda: (
            _status(api_client, namespace, "triage-v2", "finetunejobs").get("phase") == "Succeeded"
        ),
        60,
        "Succeeded",
    )

    example = (
        Path(__file__).resolve().parents[2]
        / "examples"
        / "gitops"
        / "deployments"
        / "soc-models.yaml"
    )
    target = tmp_path / "soc-models.yaml"
    shutil.copy(example, target)
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    command = [sys.executable, "-m", "sectune.cli", "promote", "--job", f"{namespace}/triage-v2"]
    command += ["--to", str(target), "--adapter", "alert-triage", "--canary", "20"]
    promoted = subprocess.run(command, capture_output=True, text=True, env=env)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert f"sha256: {published.manifest_sha256}" in target.read_text()
    assert "canary: v2 at 20 %, v1 at 80 %" in promoted.stdout + promoted.stderr

    # The stored manifest changes after the job reported it: refused, file untouched.
    manifest = Path(f"{tmp_path}/store/triage-v2/versions/r2/manifest.json")
    manifest.write_text(manifest.read_text().replace('"r2"', '"r3"'))
    shutil.copy(example, target)
    before = target.read_bytes()
    refused = subprocess.run(command, capture_output=True, text=True, env=env)
    assert refused.returncode == 2
    assert "sha256" in refused.stdout + refused.stderr
    assert target.read_bytes() == before


def test_a_drift_trigger_that_cannot_ask_prometheus_says_so(api_client, namespace, start_operator):
    """A wrong Prometheus URL used to leave retraining silently off: the schedule now says so
    in a condition, a Warning Event on each failure, and a metric an alert watches."""
    custom = client.CustomObjectsApi(api_client)
    trigger = {"adapterDeployment": "soc", "adapter": "triage", "threshold": 0.3, "forMinutes": 1}
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "finetuneschedules", _schedule("drifty", driftTrigger=trigger)
    )
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    operator = start_operator(env={"SECTUNE_PROMETHEUS_URL": nowhere})

    def condition() -> dict[str, Any]:
        conditions = _status(api_client, namespace, "drifty").get("conditions") or []
        return next((c for c in conditions if c["type"] == "DriftTrigger"), {})

    wait_until(lambda: condition().get("reason") == "QueryFailed", 60, "DriftTrigger condition")
    assert condition()["status"] == "False"
    assert f"cannot query {nowhere}" in condition()["message"]
    wait_until(
        lambda: any(r == "DriftQueryFailed" for r, _ in _events(api_client, namespace, "drifty")),
        30,
        "DriftQueryFailed Event",
    )
    metric = (
        f'sectune_operator_schedule_query_errors_total{{namespace="{namespace}",schedule="drifty"}}'
    )
    wait_until(lambda: metric in operator.metrics(), 30, "query errors counted")
    assert _runs(api_client, namespace, "drifty") == []
