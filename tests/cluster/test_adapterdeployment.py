"""AdapterDeployment against the real control plane, reconciled by the operator acting as the
chart's ServiceAccount: rendered children, FineTuneJob sources and their gates, status from
what replicas report, revisions with Events, refusals that leave served versions alone, and
garbage collection."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from sectune.serving.config import ServingConfig
from sectune.yamlio import load_yaml
from support.kube import create_job
from support.kube import finish_job as _finish_job
from support.processes import wait_until
from support.replicas import ReplicaNetwork

pytestmark = pytest.mark.cluster

GROUP, VERSION = "sectune.io", "v1alpha1"
SHA = {"pinned": "a1" * 32, "tactics": "b2" * 32, "v3": "c3" * 32, "failed": "d4" * 32}
PINNED = "s3://adapters/soc/triage/versions/run-1"


@pytest.fixture
def replicas() -> Iterator[ReplicaNetwork]:
    network = ReplicaNetwork()
    yield network
    network.stop()


@pytest.fixture
def operator(start_operator, replicas):  # type: ignore[no-untyped-def]
    return start_operator(env={"SECTUNE_SERVING_METRICS_URL": replicas.url_template})


def _custom(api_client: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def _finished_job(
    api_client: Any, namespace: str, name: str, sha256: str, gates_passed: bool = True
) -> None:
    """A FineTuneJob whose training pod ended with the trainer's result, as kwok plays it."""
    create_job(api_client, namespace, name)
    if sha256:
        _finish_job(api_client, namespace, name, sha256, gates_passed)


def _adep(name: str = "soc", replicas: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/smollm2"},
        "adapters": [
            {
                "name": "triage",
                "versions": [{"version": "v1", "source": {"uri": PINNED, "sha256": SHA["pinned"]}}],
            },
            {
                "name": "tactics",
                "versions": [{"version": "v1", "source": {"fineTuneJob": "tactics"}}],
            },
        ],
        "replicas": replicas,
        "credentials": {"name": "storage"},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": body,
    }


def _get(
    api_client: Any, namespace: str, name: str = "soc", plural: str = "adapterdeployments"
) -> dict[str, Any]:
    return _custom(api_client).get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)


def _status(api_client: Any, namespace: str, name: str = "soc") -> dict[str, Any]:
    return _get(api_client, namespace, name).get("status") or {}


def _condition(api_client: Any, namespace: str, type_: str) -> dict[str, Any]:
    conditions = _status(api_client, namespace).get("conditions") or []
    return next((c for c in conditions if c["type"] == type_), {})


def _rendered(api_client: Any, namespace: str, name: str = "soc") -> ServingConfig | None:
    try:
        configmap = client.CoreV1Api(api_client).read_namespaced_config_map(
            f"{name}-serve", namespace
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return ServingConfig.model_validate(load_yaml(configmap.data["serving.yaml"]))


def _traffic(config: ServingConfig | None) -> dict[str, dict[str, tuple[str | None, int]]]:
    if config is None:
        return {}
    return {a.name: {v.version: (v.sha256, v.traffic) for v in a.versions} for a in config.adapters}


def _events(api_client: Any, namespace: str, name: str = "soc") -> list[tuple[str, str]]:
    events = client.CoreV1Api(api_client).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [(e.reason, e.message) for e in events.items]


def _report(config: ServingConfig) -> str:
    """What a replica serving `config` exports."""
    lines = ["# TYPE sectune_serve_adapter_info gauge"]
    for adapter in config.adapters:
        for v in adapter.versions:
            lines.append(
                f'sectune_serve_adapter_info{{adapter="{adapter.name}",version="{v.version}",'
                f'sha256="{v.sha256}",traffic="{v.traffic}"}} 1.0'
            )
    return "\n".join(lines) + "\n"


def _ready_pods(api_client: Any, namespace: str) -> list[str]:
    pods = (
        client.CoreV1Api(api_client)
        .list_namespaced_pod(namespace, label_selector="sectune.io/adapterdeployment=soc")
        .items
    )
    return sorted(
        p.metadata.name
        for p in pods
        if p.status.phase == "Running" and not p.metadata.deletion_timestamp
    )


def _secret(api_client: Any, namespace: str) -> None:
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "storage"},
            "stringData": {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"},
        },
    )


def test_renders_children_and_reports_what_the_replicas_serve(
    api_client, namespace, operator, replicas
):
    _secret(api_client, namespace)
    _finished_job(api_client, namespace, "tactics", SHA["tactics"])
    _custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", _adep()
    )

    wait_until(lambda: _rendered(api_client, namespace) is not None, 30, "rendered ConfigMap")
    config = _rendered(api_client, namespace)
    assert _traffic(config) == {
        "triage": {"v1": (SHA["pinned"], 100)},
        "tactics": {"v1": (SHA["tactics"], 100)},
    }
    assert config is not None and config.adapters[1].versions[0].uri == (
        "s3://adapters/soc/tactics/versions/run-9"
    )
    apps, core, policy = (
        client.AppsV1Api(api_client),
        client.CoreV1Api(api_client),
        client.PolicyV1Api(api_client),
    )
    deployment = apps.read_namespaced_deployment("soc-serve", namespace)
    owner = deployment.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("AdapterDeployment", "soc", True)
    pod = deployment.spec.template.spec
    assert pod.containers[0].command[:2] == ["sectune", "serve"]
    assert pod.security_context.run_as_non_root is True
    assert pod.automount_service_account_token is False
    assert core.read_namespaced_service("soc-serve", namespace).spec.ports[0].port == 8000
    assert (
        policy.read_namespaced_pod_disruption_budget("soc-serve", namespace).spec.max_unavailable
        == 1
    )

    # Replicas run (kwok) but report nothing yet: the revision is not served.
    wait_until(lambda: len(_ready_pods(api_client, namespace)) == 2, 60, "two server pods")
    wait_until(lambda: _status(api_client, namespace).get("readyReplicas") == 2, 30, "ready 2")
    status = _status(api_client, namespace)
    assert status["phase"] == "Progressing"
    assert status["activeAdapters"] == []
    assert status["endpoint"] == f"http://soc-serve.{namespace}.svc:8000/v1"

    pods = _ready_pods(api_client, namespace)
    assert config is not None
    for pod_name in pods:
        replicas.set_text(pod_name, _report(config))
    wait_until(lambda: _status(api_client, namespace).get("phase") == "Ready", 30, "Ready")
    status = _status(api_client, namespace)
    assert {(a["name"], a["version"], a["sha256"]) for a in status["activeAdapters"]} == {
        ("triage", "v1", SHA["pinned"]),
        ("tactics", "v1", SHA["tactics"]),
    }
    assert status["ready"] == "2/2" and status["revision"] == 1
    assert status["history"][0]["adapters"] == "triage v1 100%; tactics v1 100%"
    assert ("Rendered", "Rendered revision 1: triage v1 100%; tactics v1 100%") in _events(
        api_client, namespace
    )
    # No canary: analysis has nothing to say; with one it would say Prometheus is not set.
    assert _condition(api_client, namespace, "CanaryAnalysis")["reason"] == "NoCanary"

    # One replica loses a version it was asked to serve: the status says which and what.
    lines = _report(config).splitlines()
    replicas.set_text(
        pods[0],
        "\n".join(line for line in lines if 'adapter="tactics"' not in line)
        + '\n# TYPE sectune_serve_adapter_refused gauge\nsectune_serve_adapter_refused{adapter="tactics",version="v1",reason="integrity"} 1.0\n',
    )
    wait_until(
        lambda: _status(api_client, namespace).get("phase") == "Progressing", 30, "swap incomplete"
    )
    degraded = _condition(api_client, namespace, "Degraded")
    assert degraded["status"] == "True"
    assert degraded["message"] == f"{pods[0]} refused tactics@v1 (integrity)"
    assert {a["name"] for a in _status(api_client, namespace)["activeAdapters"]} == {"triage"}

    # Deleting it garbage-collects every child.
    _custom(api_client).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", "soc"
    )

    def children_gone() -> bool:
        try:
            apps.read_namespaced_deployment("soc-serve", namespace)
            return False
        except ApiException as exc:
            return exc.status == 404

    wait_until(children_gone, 60, "Deployment garbage-collected")
    wait_until(lambda: _rendered(api_client, namespace) is None, 60, "ConfigMap garbage-collected")


def test_a_vllm_deployment_is_ready_from_what_its_router_sidecars_report(
    api_client, namespace, operator, replicas
):
    """runtime: vllm reads what a replica serves from the router sidecar's metrics port (9400),
    never from vLLM's own port (8001), whose metrics have no sectune series."""
    _secret(api_client, namespace)
    _finished_job(api_client, namespace, "tactics", SHA["tactics"])
    _custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", _adep(runtime="vllm")
    )
    wait_until(lambda: _rendered(api_client, namespace) is not None, 30, "rendered ConfigMap")
    config = _rendered(api_client, namespace)
    assert config is not None
    wait_until(lambda: len(_ready_pods(api_client, namespace)) == 2, 60, "two vLLM pods")
    pods = _ready_pods(api_client, namespace)
    template = client.AppsV1Api(api_client).read_namespaced_deployment("soc-serve", namespace)
    assert [c.name for c in template.spec.template.spec.containers] == ["server", "router"]
    # vLLM's port answers its own series: no version is reported served from there.
    for pod_name in pods:
        replicas.set_text(pod_name, 'vllm:num_requests_running{model_name="base"} 0.0\n', 8001)
    wait_until(lambda: _status(api_client, namespace).get("readyReplicas") == 2, 30, "ready 2")
    assert _status(api_client, namespace)["phase"] == "Progressing"
    for pod_name in pods:
        replicas.set_text(pod_name, _report(config), 9400)
    wait_until(lambda: _status(api_client, namespace).get("phase") == "Ready", 30, "Ready")
    assert {(a["name"], a["sha256"]) for a in _status(api_client, namespace)["activeAdapters"]} == {
        ("triage", SHA["pinned"]),
        ("tactics", SHA["tactics"]),
    }


def test_gates_decide_what_is_rendered_and_a_job_that_passes_later_is_picked_up(
    api_client, namespace, operator, replicas
):
    _secret(api_client, namespace)
    _finished_job(api_client, namespace, "tactics", SHA["tactics"])
    _finished_job(api_client, namespace, "triage-failed", SHA["failed"], gates_passed=False)
    _finished_job(api_client, namespace, "triage-v3", "")  # still training
    spec = _adep(replicas=1)
    spec["spec"]["adapters"][0]["versions"] = [
        {"version": "v1", "source": {"uri": PINNED, "sha256": SHA["pinned"]}, "traffic": 80},
        {"version": "v2", "source": {"fineTuneJob": "triage-failed"}, "traffic": 10},
        {"version": "v3", "source": {"fineTuneJob": "triage-v3"}, "traffic": 10},
    ]
    _custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", spec
    )
    wait_until(lambda: _rendered(api_client, namespace) is not None, 30, "rendered ConfigMap")
    assert _traffic(_rendered(api_client, namespace))["triage"] == {"v1": (SHA["pinned"], 100)}
    wait_until(lambda: _condition(api_client, namespace, "VersionsResolved"), 30, "condition")
    resolved = _condition(api_client, namespace, "VersionsResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "GatesFailed")
    assert (
        "triage@v2: FineTuneJob triage-failed did not pass its gates "
        "(recall[malicious]>=0.95 measured 0.81)" in resolved["message"]
    )
    assert "triage@v3: FineTuneJob triage-v3 is" in resolved["message"]
    assert any(reason == "GatesFailed" for reason, _ in _events(api_client, namespace))
    assert _status(api_client, namespace)["revision"] == 1

    # The running job passes its gates: its version is rendered with its share.
    _finish_job(api_client, namespace, "triage-v3", SHA["v3"])
    wait_until(
        lambda: "v3" in _traffic(_rendered(api_client, namespace)).get("triage", {}),
        30,
        "v3 rendered",
    )
    assert _traffic(_rendered(api_client, namespace))["triage"] == {
        "v1": (SHA["pinned"], 89),
        "v3": (SHA["v3"], 11),
    }
    wait_until(lambda: _status(api_client, namespace).get("revision") == 2, 30, "revision 2")
    assert any(
        reason == "Rendered" and message.startswith("Rendered revision 2: triage v1 89%, v3 11%")
        for reason, message in _events(api_client, namespace)
    )

    # A canary without Prometheus: analysis is off, and the condition says so.
    config = _rendered(api_client, namespace)
    assert config is not None
    wait_until(lambda: _ready_pods(api_client, namespace), 60, "server pod")
    replicas.set_text(_ready_pods(api_client, namespace)[0], _report(config))
    wait_until(
        lambda: (
            _condition(api_client, namespace, "CanaryAnalysis").get("reason")
            == "PrometheusNotConfigured"
        ),
        30,
        "analysis off",
    )

    # A spec change to an unknown job for triage: triage keeps what it served, nothing stops.
    patch = {"spec": {"adapters": [
        {"name": "triage", "versions": [{"version": "v4", "source": {"fineTuneJob": "nope"}}]},
        spec["spec"]["adapters"][1],
    ]}}  # fmt: skip
    _custom(api_client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", "soc", patch
    )
    wait_until(
        lambda: (
            _condition(api_client, namespace, "VersionsResolved").get("reason") == "JobNotFound"
        ),
        30,
        "unknown job reported",
    )
    message = _condition(api_client, namespace, "VersionsResolved")["message"]
    assert message == (
        f"triage@v4: FineTuneJob nope does not exist in {namespace}; still serving the previous "
        "versions of triage"
    )
    assert _traffic(_rendered(api_client, namespace))["triage"] == {
        "v1": (SHA["pinned"], 89),
        "v3": (SHA["v3"], 11),
    }


def test_a_bad_adapterdeployment_is_refused_by_the_api_server(api_client, namespace):
    bad = _adep()
    bad["spec"]["adapters"][0]["versions"][0]["traffic"] = 60
    with pytest.raises(ApiException) as refused:
        _custom(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "adapterdeployments", bad
        )
    assert "traffic of one adapter's versions must add up to 100" in refused.value.body
    long_name = _adep(name="s" * 58)
    with pytest.raises(ApiException) as refused:
        _custom(api_client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, "adapterdeployments", long_name
        )
    assert "at most 57 characters" in refused.value.body


def test_operator_identity_may_manage_servers_and_nothing_more(operator_kubeconfig, namespace):
    from kubernetes import config as kube_config

    as_operator = kube_config.new_client_from_config(str(operator_kubeconfig))
    apps = client.AppsV1Api(as_operator)
    with pytest.raises(ApiException) as refused:
        apps.delete_collection_namespaced_deployment(namespace)
    assert refused.value.status == 403
    with pytest.raises(ApiException) as refused:
        client.PolicyV1Api(as_operator).list_namespaced_pod_disruption_budget(namespace)
    assert refused.value.status == 403
    with pytest.raises(ApiException) as refused:
        client.CoreV1Api(as_operator).create_namespaced_pod(
            namespace,
            {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}},
        )
    assert refused.value.status == 403
    assert apps.list_namespaced_deployment(namespace).items == []


def test_the_shipped_example_renders_what_it_can_and_says_what_it_waits_for(
    api_client, namespace, operator, control_plane
):
    from pathlib import Path

    example = (
        Path(__file__).resolve().parents[2] / "examples" / "serving" / "adapterdeployment.yaml"
    )
    applied = control_plane.kubectl("apply", "-n", namespace, "-f", str(example))
    assert applied.returncode == 0, applied.stderr

    def rendered() -> ServingConfig | None:
        return _rendered(api_client, namespace, "soc-models")

    wait_until(lambda: rendered() is not None, 30, "rendered ConfigMap")
    # The pinned alert-triage v1 is served; the FineTuneJobs it names do not exist here.
    assert _traffic(rendered()) == {
        "alert-triage": {
            "v1": ("9f2c6d5e0b8a47c1d3e2f4a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f", 100)
        }
    }

    def resolved_condition() -> dict[str, Any] | None:
        conditions = _status(api_client, namespace, "soc-models").get("conditions") or []
        return next((c for c in conditions if c["type"] == "VersionsResolved"), None)

    wait_until(lambda: resolved_condition() is not None, 30, "VersionsResolved condition")
    resolved = resolved_condition()
    assert resolved is not None
    assert resolved["reason"] == "JobNotFound"
    assert "alert-triage@v2: FineTuneJob alert-triage does not exist" in resolved["message"]
    assert "attack-tactics@v1: FineTuneJob attack-tactics does not exist" in resolved["message"]
    deployment = client.AppsV1Api(api_client).read_namespaced_deployment(
        "soc-models-serve", namespace
    )
    container = deployment.spec.template.spec.containers[0]
    assert container.resources.limits == {"cpu": "4", "memory": "8Gi"}
    assert container.command[-2:] == ["--api-keys-file", "/etc/sectune/keys/api-keys"]


def test_a_child_of_the_same_name_that_it_does_not_own_is_never_taken_over(
    api_client, namespace, operator
):
    """Someone's ConfigMap named <adep>-serve already exists: the operator leaves it as it
    was, says so in a Warning Event, and renders once it is gone."""
    core = client.CoreV1Api(api_client)
    core.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "soc-serve"}, "data": {"serving.yaml": "someone else's"}},
    )
    _custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", _adep()
    )

    def warned() -> bool:
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=soc"
        ).items
        return any(e.reason == "ChildNotOwned" for e in events)

    wait_until(warned, 60, "ChildNotOwned Event")
    kept = core.read_namespaced_config_map("soc-serve", namespace)
    assert kept.data == {"serving.yaml": "someone else's"} and not kept.metadata.owner_references

    core.delete_namespaced_config_map("soc-serve", namespace)
    wait_until(lambda: _rendered(api_client, namespace) is not None, 120, "rendered after")
    owned = core.read_namespaced_config_map("soc-serve", namespace)
    assert [ref.kind for ref in owned.metadata.owner_references] == ["AdapterDeployment"]


def test_a_canary_analysts_keep_correcting_is_rolled_back_on_its_verdicts(
    api_client, namespace, start_operator, replicas, prometheus
):
    """One replica serves v1 (stable) and v2 (a 10 % canary) with a feedback store; its
    requests are fine (few errors, quick), but analysts' verdicts put v2's live macro-F1 at
    0.6 against v1's 0.9 on 100 verdicts each: the real Prometheus is asked, the bootstrap
    finds v2 worse, and v2 leaves traffic."""
    _secret(api_client, namespace)
    other = "s3://adapters/soc/triage/versions/run-2"
    body = _adep(
        replicas=1,
        adapters=[
            {
                "name": "triage",
                "versions": [
                    {"version": "v1", "traffic": 90, "source": {"uri": PINNED, "sha256": SHA["pinned"]}},
                    {"version": "v2", "traffic": 10, "source": {"uri": other, "sha256": SHA["v3"]}},
                ],
            }
        ],
        feedback={"store": "s3://verdicts/soc"},
        promotion={
            "rollback": {"windowMinutes": 1, "minRequests": 10, "minVerdicts": 30,
                         "maxMacroF1Drop": 0.05, "outcomeWindowMinutes": 60},
        },
    )  # fmt: skip
    watching = start_operator(env={"SECTUNE_SERVING_METRICS_URL": replicas.url_template})
    _custom(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", body
    )
    wait_until(lambda: len(_ready_pods(api_client, namespace)) == 1, 60, "one server pod")
    [pod] = _ready_pods(api_client, namespace)
    config = _rendered(api_client, namespace)
    assert config is not None and config.feedback.store == "s3://verdicts/soc"

    def verdicts(version: str, right: int, wrong: int) -> str:
        cells = {("benign", "benign"): right, ("malicious", "malicious"): right,
                 ("benign", "malicious"): wrong, ("malicious", "benign"): wrong}  # fmt: skip
        return "".join(
            f'sectune_serve_verdicts_total{{adapter="triage",version="{version}",'
            f'predicted="{p}",actual="{a}",correct="{str(p == a).lower()}"}} {n}.0\n'
            for (p, a), n in cells.items()
        )

    def requests(count: int) -> str:
        return (
            "# TYPE sectune_serve_requests_total counter\n"
            f'sectune_serve_requests_total{{adapter="triage",version="v2",endpoint="classify",'
            f'code="200",routing="traffic"}} {count}.0\n'
        )

    # Verdicts first, then canary traffic, as a server exports them over time.
    stamp = "# TYPE sectune_serve_verdicts_total counter\n"
    replicas.set_text(pod, _report(config) + stamp + verdicts("v1", 45, 5) + verdicts("v2", 30, 20))
    port = replicas.url_template.split(":")[2].split("/")[0]
    prometheus.start(
        [
            {
                "job_name": "sectune-serve",
                "metrics_path": f"/{pod}/8000/metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": namespace, "pod": pod}}
                ],
            }
        ]
    )  # fmt: skip
    wait_until(lambda: prometheus.query("sectune_serve_verdicts_total"), 30, "verdicts scraped")
    watching.stop()
    start_operator(
        name="operator-with-prometheus",
        env={
            "SECTUNE_SERVING_METRICS_URL": replicas.url_template,
            "SECTUNE_PROMETHEUS_URL": prometheus.url,
        },
    )
    count = 0

    def rolled_back() -> bool:
        nonlocal count
        count += 5
        text = _report(config) + requests(count) + stamp
        replicas.set_text(pod, text + verdicts("v1", 45, 5) + verdicts("v2", 30, 20))
        return bool(_status(api_client, namespace).get("rolledBack"))

    try:
        wait_until(rolled_back, 120, "canary rolled back on its verdicts", interval=1)
    except TimeoutError:
        conditions = _status(api_client, namespace).get("conditions")
        raise AssertionError(f"no rollback; conditions: {conditions}") from None
    [record] = _status(api_client, namespace)["rolledBack"]
    assert (record["adapter"], record["version"], record["metric"]) == (
        "triage", "v2", "liveMacroF1Drop",
    )  # fmt: skip
    assert record["value"] == pytest.approx(0.9 - 0.6)
    condition = _condition(api_client, namespace, "CanaryRolledBack")
    assert "triage@v2: liveMacroF1Drop 0.3 above 0.05" in condition["message"]
