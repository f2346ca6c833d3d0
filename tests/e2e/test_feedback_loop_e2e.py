"""The verdict loop on the cluster, every step on the real parts: an AdapterDeployment with a
feedback store serves triage v1 (its server pod run as a local process, see Kubelet) → a few
hundred alerts are classified → analysts' verdicts correct what it gets wrong → the chart's
rules in a real Prometheus put its live macro-F1 below its offline one and the alert fires →
the FineTuneSchedule's quality trigger starts a run that trains (the operator-rendered trainer
container, run locally) on the data plus the verdicts → its gate on the newest verdicts,
against the served version, passes → the schedule adds it as a canary → canary analysis on
requests and verdicts finds it within bounds → `sectune promote --finalize` moves all traffic
to it and every answer comes from the new version."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from sectune import storage
from sectune.yamlio import dump_yaml, load_yaml, load_yaml_all
from support.jobs import sectune, tiny_job, write_dataset
from support.kube import finish_pod, run_trainer_pod_locally
from support.processes import free_port, tool, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.timeout(1200)]

GROUP, VERSION = "sectune.io", "v1alpha1"
CHART = Path(__file__).resolve().parents[2] / "charts/sectune"
KEY = "soc-console-key-0123456789abcdef"
ALERT = "SectuneLiveQualityDropped"


def _chart_rules(path: Path) -> Path:
    """The rules of the chart's PrometheusRule as `helm install` renders them, with the one
    value a team changes to see the alert within the test: its `for` (15m by default)."""
    args = [tool("helm"), "template", "sectune", str(CHART), "--kube-version", "1.37.2"]
    args += ["--api-versions", "monitoring.coreos.com/v1"]
    args += ["--set-json", f'monitoring.alerts={{"{ALERT}": {{"for": "5s"}}}}']
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    [rule] = [d for d in load_yaml_all(text) if d and d["kind"] == "PrometheusRule"]
    path.write_text(dump_yaml({"groups": rule["spec"]["groups"]}))
    return path


def _get(api_client: Any, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return dict(
        client.CustomObjectsApi(api_client).get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name
        )
    )


def _traffic(api_client: Any, namespace: str) -> dict[str, int]:
    """What the AdapterDeployment's spec gives each triage version."""
    [triage] = _get(api_client, namespace, "adapterdeployments", "soc")["spec"]["adapters"]
    return {v["version"]: v.get("traffic", 100) for v in triage["versions"]}


def _served(api_client: Any, namespace: str) -> dict[str, tuple[str, int]]:
    """What the replicas report serving: version -> (sha256, traffic)."""
    status = _get(api_client, namespace, "adapterdeployments", "soc").get("status") or {}
    return {a["version"]: (a["sha256"], a["traffic"]) for a in status.get("activeAdapters", [])}


def _condition(api_client: Any, namespace: str, kind: str) -> dict[str, Any]:
    status = _get(api_client, namespace, "adapterdeployments", "soc").get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def test_verdicts_retrain_the_served_adapter_through_gate_canary_and_promotion(
    api_client,
    namespace,
    control_plane,
    start_operator,
    kubelet,
    prometheus,
    trained,
    tiny_model_dir,
    s3_server,
    s3_env,
    tmp_path,
):
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    core.create_namespaced_secret(
        namespace, {"metadata": {"name": "storage"}, "stringData": trained.env}
    )
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "soc-keys"}, "stringData": {"api-keys": f"soc-console {KEY}\n"}},
    )
    train = write_dataset(tmp_path / "train.jsonl", 48, seed=31)
    s3_server.client().upload_file(str(train), trained.bucket, f"loop-{namespace}/train.jsonl")
    store = f"s3://{trained.bucket}/loop-{namespace}/verdicts"

    # Prometheus discovers the server pod from a file (as Kubernetes SD would find it).
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    prometheus.start(
        [{"job_name": "sectune-serve",
          "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}],
        rule_files=[_chart_rules(tmp_path / "rules.yaml")],
    )  # fmt: skip
    trainer_metrics = free_port()
    start_operator(
        env={
            "SECTUNE_SERVING_METRICS_URL": kubelet.network.url_template,
            "SECTUNE_PROMETHEUS_URL": prometheus.url,
            "SECTUNE_PROGRESS_URL": f"http://127.0.0.1:{trainer_metrics}/metrics",
            "SECTUNE_ALLOW_FILE_URIS": "true",
        }
    )

    # 1. Serve triage v1 with a feedback store.
    deployment = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": "soc"},
        "spec": {
            "baseModel": {"uri": f"file://{tiny_model_dir}"},
            "adapters": [{"name": "triage", "versions": [{
                "version": "v1",
                "source": {"uri": trained.triage_v1.uri, "sha256": trained.triage_v1.sha256},
            }]}],
            "credentials": {"name": "storage"},
            "authSecret": {"name": "soc-keys"},
            "feedback": {"store": store, "batchSize": 25, "flushSeconds": 0.5,
                         "minVerdicts": 50, "maxDrop": 0.0},
            # The tiny model answers one label whatever it reads: its label mix "drifts" by
            # design, so drift is not what this canary is judged on; requests and verdicts are.
            "promotion": {"rollback": {"windowMinutes": 5, "minRequests": 20, "maxDrift": 1.0,
                                       "outcomeWindowMinutes": 60, "minVerdicts": 20}},
        },
    }  # fmt: skip
    manifest = tmp_path / "soc.yaml"
    manifest.write_text(dump_yaml(deployment))
    applied = control_plane.kubectl("apply", "-n", namespace, "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    wait_until(kubelet.sync_once, 30, "rendered ConfigMap")

    def running() -> list[str]:
        pods = core.list_namespaced_pod(
            namespace, label_selector="sectune.io/adapterdeployment=soc"
        ).items
        return [p.metadata.name for p in pods if p.status.phase == "Running"]

    wait_until(running, 60, "the server pod")
    [pod] = running()
    kubelet.start_pod(
        pod, client.AppsV1Api(api_client).read_namespaced_deployment("soc-serve", namespace)
    )
    server, url = kubelet.replicas[pod]
    server.wait_http(f"{url}/readyz", timeout=180)
    threading.Thread(target=kubelet.sync_forever, daemon=True).start()
    address = url.removeprefix("http://")
    targets.write_text(json.dumps([{"targets": [address],
                                    "labels": {"namespace": namespace, "pod": pod}}]))  # fmt: skip
    wait_until(lambda: "v1" in _served(api_client, namespace), 60, "v1 served")

    def ask(text: str) -> httpx.Response:
        answer = httpx.post(f"{url}/v1/classify", json={"model": "triage", "input": text},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        return answer

    def judge(answer_id: str, label: str) -> None:
        posted = httpx.post(f"{url}/v1/feedback", json={"id": answer_id, "label": label},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip
        assert posted.status_code == 200, posted.text

    # 2. A few hundred alerts; analysts review every answer it got wrong and every other one
    # it got right (escalations first, as a queue does).
    alerts = [json.loads(line) for line in
              write_dataset(tmp_path / "alerts.jsonl", 300, seed=21).read_text().splitlines()]  # fmt: skip
    answers = [ask(alert["text"]).json() for alert in alerts]
    reviewed = [
        (answer, alert["label"])
        for i, (answer, alert) in enumerate(zip(answers, alerts, strict=True))
        if answer["label"] != alert["label"] or i % 4 < 2
    ]
    for answer, label in reviewed:
        judge(answer["id"], label)

    # 3. Live quality in the real Prometheus, by the chart's rules, and the alert fires.
    from sklearn.metrics import f1_score

    live = f1_score([label for _, label in reviewed], [a["label"] for a, _ in reviewed],
                    average="macro")  # fmt: skip
    v1 = 'adapter="triage",version="v1"'

    def recorded(name: str) -> float | None:
        rows = prometheus.query(f"{name}{{{v1}}}")
        return float(rows[0]["value"][1]) if rows else None

    wait_until(lambda: recorded("sectune:serve_verdicts:sum1d") == len(reviewed), 60,
               "the verdicts in Prometheus")  # fmt: skip
    assert recorded("sectune:serve_live_macro_f1:1d") == pytest.approx(live)
    offline = recorded("sectune_serve_offline_macro_f1")
    assert offline is not None and live < offline, (live, offline)  # what analysts saw
    wait_until(
        lambda: prometheus.query(f'ALERTS{{alertname="{ALERT}",alertstate="firing",{v1}}}'),
        60,
        f"{ALERT} firing",
    )

    # 4. The schedule retrains when live quality stays below what v1 was evaluated at.
    spec = tiny_job(
        "triage", tiny_model_dir, train,
        dataset={"train": f"s3://{trained.bucket}/loop-{namespace}/train.jsonl",
                 "feedback": {"uri": f"{store}/triage", "holdOut": 0.25}},
        evaluation={"probeExamples": 4, "gates": [
            {"metric": "macroF1", "basis": "verdicts", "overBaseline": "previous", "min": 0.0}]},
        resources={"gpus": 0, "cpu": "2", "memory": "4Gi"},
        output={"uri": f"s3://{trained.bucket}/loop-{namespace}/adapters",
                "credentials": {"name": "storage"}},
    )["spec"]  # fmt: skip
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "finetuneschedules", {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneSchedule",
        "metadata": {"name": "triage-retrain"},
        "spec": {
            "qualityTrigger": {"adapterDeployment": "soc", "adapter": "triage",
                               "minMacroF1": round(offline, 4), "minVerdicts": 50,
                               "forMinutes": 1},
            "promote": {"adapterDeployment": "soc", "adapter": "triage", "canaryPercent": 50},
            "jobTemplate": spec,
        },
    })  # fmt: skip

    def runs() -> list[dict[str, Any]]:
        return list(custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, "finetunejobs",
            label_selector="sectune.io/finetuneschedule=triage-retrain",
        )["items"])  # fmt: skip

    wait_until(runs, 150, "a run started by the quality trigger")
    run = runs()[0]
    name = run["metadata"]["name"]
    assert name.startswith("triage-retrain-q")
    # It is held to the version analysts judged, as its servers verified it.
    assert run["spec"]["evaluation"]["previousVersion"] == {
        "uri": trained.triage_v1.uri,
        "sha256": trained.triage_v1.sha256,
    }
    annotations = run["metadata"]["annotations"]
    assert annotations["sectune.io/previous-version"] == "served by soc: triage@v1"
    assert "live macro-F1 of soc/triage stayed below" in annotations["sectune.io/triggered-by"]

    # 5. The trainer container the operator rendered trains on the data and the verdicts.
    wait_until(lambda: client.BatchV1Api(api_client).list_namespaced_job(namespace).items, 30,
               "the training Job")  # fmt: skip
    process, termination = run_trainer_pod_locally(
        api_client, namespace, f"{name}-train", tmp_path / "pod", trainer_metrics
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    finish_pod(api_client, namespace, name, process.returncode, termination.read_text())
    wait_until(
        lambda: (
            (_get(api_client, namespace, "finetunejobs", name).get("status") or {}).get("phase")
            == "Succeeded"
        ),
        60,
        f"{name} Succeeded",
    )
    result = _get(api_client, namespace, "finetunejobs", name)["status"]
    report = json.loads(storage.read_bytes(f"{result['adapter']['uri']}/report.json"))
    fed = report["data"]["sources"]["feedback"]
    assert fed["rows"] == len(reviewed) and fed["used"] > 0
    assert report["verdicts"]["rows"] == fed["heldOut"] > 0
    [gate] = report["gates"]
    assert gate["name"] == "macroF1-over-previous@verdicts>=0" and gate["passed"]
    assert report["previousVersion"]["sha256"] == trained.triage_v1.sha256

    # 6. Its gates passed: the schedule adds it as a 50 % canary, the replica serves both.
    wait_until(lambda: _traffic(api_client, namespace) == {"v1": 50, name: 50}, 60,
               "the run added as a canary")  # fmt: skip
    wait_until(lambda: set(_served(api_client, namespace)) == {"v1", name}, 90,
               "the canary served")  # fmt: skip
    assert _served(api_client, namespace)[name][0] == result["adapter"]["sha256"]

    # Canary analysis: requests the split sends it, and the verdicts on both versions.
    fresh = [json.loads(line) for line in
             write_dataset(tmp_path / "fresh.jsonl", 120, seed=22).read_text().splitlines()]  # fmt: skip
    seen: dict[str, int] = {}
    for alert in fresh:
        answer = ask(alert["text"])
        model = answer.headers["x-sectune-model"]
        seen[model] = seen.get(model, 0) + 1
        judge(answer.json()["id"], alert["label"])
    assert set(seen) == {"triage@v1", f"triage@{name}"}

    def judged() -> bool:
        condition = _condition(api_client, namespace, "CanaryAnalysis")
        return condition.get("reason") == "WithinBounds" and "verdicts over 60m" in condition.get(
            "message", ""
        )

    wait_until(judged, 120, "canary analysis on requests and verdicts")
    assert f"triage@{name}" in _condition(api_client, namespace, "CanaryAnalysis")["message"]
    assert not (
        _get(api_client, namespace, "adapterdeployments", "soc")["status"].get("rolledBack")
    )

    # 7. Promoted the GitOps way: the manifest as held in Git, `sectune promote --finalize`,
    # kubectl apply. Every answer now comes from the retrained version.
    live_spec = _get(api_client, namespace, "adapterdeployments", "soc")["spec"]
    manifest.write_text(dump_yaml({**deployment, "spec": live_spec}))
    finalized = sectune("promote", "--to", str(manifest), "--adapter", "triage", "--finalize")
    assert finalized.returncode == 0, finalized.stderr
    [versions] = [a["versions"] for a in load_yaml(manifest.read_text())["spec"]["adapters"]]
    assert [(v["version"], v.get("traffic", 100)) for v in versions if v.get("traffic", 100)] == [
        (name, 100)
    ]
    applied = control_plane.kubectl("apply", "-n", namespace, "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    wait_until(
        lambda: {v: t for v, (_, t) in _served(api_client, namespace).items() if t} == {name: 100},
        90,
        "the retrained version takes all traffic",
    )
    assert {ask(alert["text"]).headers["x-sectune-model"] for alert in fresh[:10]} == {
        f"triage@{name}"
    }
