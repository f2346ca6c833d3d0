"""The chart as installed: its default values rendered by helm, each operator replica started
with the rendered arguments and environment (the image's entrypoint, `python -m
sectune_operator`) as a local process with the chart's ServiceAccount. Exactly one replica acts,
a standby takes over when the leader is killed, and a single replica acts alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from sectune.yamlio import load_yaml_all
from support.operator import CHART, OPERATOR_NAMESPACE
from support.processes import ProcessExited, Server, free_port, tool, wait_until

pytestmark = pytest.mark.cluster
ROOT = CHART.parents[1]


def render(*values: str) -> list[dict[str, Any]]:
    args = [tool("helm"), "template", "sectune", str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--kube-version", "1.37.2"]
    for value in values:
        args += ["--set", value]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in load_yaml_all(text) if d]


def _deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in documents if d["kind"] == "Deployment")


def _replica(deployment: dict[str, Any], name: str, kubeconfig: Path, workdir: Path) -> Server:
    """One pod of the rendered Deployment as a process: its args and env, its own ports (picked
    again if another process took one between picking and binding)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    for attempt in range(3):
        health = free_port()
        ports = {
            "KUBECONFIG": str(kubeconfig),  # in a pod: the ServiceAccount's token
            "SECTUNE_METRICS_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        args = [*(container.get("args") or []), "--liveness", f"http://127.0.0.1:{health}/healthz"]
        server = Server(
            name,
            [sys.executable, "-m", "sectune_operator", *args],
            workdir / f"{name}-{attempt}.log",
            env=env | ports,
        ).start()
        try:
            server.wait_http(f"http://127.0.0.1:{health}/healthz")
            time.sleep(1)  # another process may have answered on that port: is ours alive?
            server.ensure_alive()
            return server
        except ProcessExited:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _ftj(api_client: Any, namespace: str, name: str) -> None:
    body = {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/smollm2"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "task": {"labels": ["benign", "malicious"]},
            "output": {"uri": "s3://adapters/soc"},
        },
    }
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "sectune.io", "v1alpha1", namespace, "finetunejobs", body
    )


def _acted(server: Server, job: str) -> bool:
    return f"Created Job {job}-train" in server.log_path.read_text(errors="replace")


def test_default_install_elects_one_replica_and_fails_over(
    api_client, namespace, operator_kubeconfig, control_plane, tmp_path
):
    documents = render()
    deployment = _deployment(documents)
    replicas = deployment["spec"]["replicas"]
    assert replicas == 2
    # The chart renders no peering object (Helm could not map it before its CRD exists):
    # the operator creates it at start-up.
    assert not [d for d in documents if "Peering" in d["kind"]]
    peering = ["clusterkopfpeering", "sectune"]
    control_plane.kubectl("delete", *peering, "--ignore-not-found")

    servers = [
        _replica(deployment, f"replica-{i}", operator_kubeconfig, tmp_path) for i in range(replicas)
    ]
    try:
        wait_until(lambda: control_plane.kubectl("get", *peering).returncode == 0, 30, "peering")
        time.sleep(3)  # peers see each other through the peering object
        _ftj(api_client, namespace, "first")
        batch = client.BatchV1Api(api_client)
        wait_until(lambda: batch.list_namespaced_job(namespace).items, 60, "first Job")
        time.sleep(3)
        acted = [s for s in servers if _acted(s, "first")]
        assert len(acted) == 1, [s.log_path.read_text()[-2000:] for s in servers]
        assert not any("Pausing all operators" in s.log_path.read_text() for s in servers)
        leader = acted[0]
        [standby] = [s for s in servers if s is not leader]

        # The leader dies without a word (SIGKILL, as a lost node): the standby takes over once
        # the leader's peering record expires (peeringLifetimeSeconds).
        assert leader.process is not None
        os.killpg(leader.process.pid, signal.SIGKILL)
        leader.process.wait()
        killed = time.monotonic()
        _ftj(api_client, namespace, "second")
        lifetime = int(
            next(
                e["value"]
                for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                if e["name"] == "SECTUNE_PEERING_LIFETIME"
            )
        )
        # what the docs say: within the peering lifetime (plus the standby's next look)
        wait_until(lambda: _acted(standby, "second"), lifetime + 10, "standby took over")
        print(f"failover after SIGKILL: {time.monotonic() - killed:.1f} s (lifetime {lifetime} s)")
    finally:
        for server in servers:
            server.stop()
        control_plane.kubectl("delete", *peering, "--ignore-not-found")

    # replicaCount 1, installed afresh: the one replica creates the peering object too (its
    # peering is mandatory) and acts alone.
    single = render("replicaCount=1")
    alone = _replica(_deployment(single), "alone", operator_kubeconfig, tmp_path)
    try:
        _ftj(api_client, namespace, "third")
        wait_until(lambda: _acted(alone, "third"), 60, "single replica acted")
    finally:
        alone.stop()
        control_plane.kubectl("delete", *peering, "--ignore-not-found")


def test_chart_lints_strict_and_refuses_unknown_or_mistyped_values():
    linted = subprocess.run(
        [tool("helm"), "lint", "--strict", str(CHART)], capture_output=True, text=True
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    for bad, says in (
        ("replicaCont=2", "replicaCont"),
        ("replicaCount=two", "replicaCount"),
        ("monitoring.prometheusOperator=sometimes", "prometheusOperator"),
        ("canaryAnalysis.prometheusUrl=prometheus:9090", "prometheusUrl"),
        ("resources.limit.cpu=1", "limit"),
        ("resources.requests.cpu=lots", "cpu"),
        ("metrics.port=70000", "port"),
        ("metrics.port=0", "port"),
        ("defaultResources.cpu=eight", "cpu"),
        ("watchNamespaces={Bad_NS}", "Bad_NS"),
    ):
        with pytest.raises(subprocess.CalledProcessError) as refused:
            render(bad)
        assert says in refused.value.stderr, refused.value.stderr


def test_values_users_expect_are_accepted_and_reach_the_operator_pod():
    """An umbrella chart's `global`, placement, pull secrets, annotations and names; two
    replicas spread over nodes and kept through drains."""
    documents = render(
        "global.imageRegistry=registry.example.com",
        "nodeSelector.pool=system",
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
        "imagePullSecrets[0].name=regcred",
        "podAnnotations.team=soc",
        "fullnameOverride=secops",
    )
    deployment = _deployment(documents)
    pod = deployment["spec"]["template"]
    assert deployment["metadata"]["name"] == "secops"
    assert pod["spec"]["nodeSelector"] == {"pool": "system"}
    assert pod["spec"]["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["annotations"]["team"] == "soc"
    spread = pod["spec"]["affinity"]["podAntiAffinity"]
    assert (
        spread["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"][
            "topologyKey"
        ]
        == "kubernetes.io/hostname"
    )
    [budget] = [d for d in documents if d["kind"] == "PodDisruptionBudget"]
    assert budget["spec"]["minAvailable"] == 1
    assert not [d for d in render("replicaCount=1") if d["kind"] == "PodDisruptionBudget"]


def test_monitoring_resources_follow_the_prometheus_operator_api():
    plain = render()
    assert not [d for d in plain if d["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule")]
    operator_pod = _deployment(plain)["spec"]["template"]["metadata"]["annotations"]
    assert operator_pod["prometheus.io/scrape"] == "true"

    args = [tool("helm"), "template", "sectune", str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--kube-version", "1.37.2", "--api-versions", "monitoring.coreos.com/v1"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    documents = [d for d in load_yaml_all(text) if d]
    kinds = sorted(d["kind"] for d in documents if d["apiVersion"] == "monitoring.coreos.com/v1")
    assert kinds == ["PodMonitor", "PodMonitor", "PrometheusRule", "ServiceMonitor"]
    [rule] = [d for d in documents if d["kind"] == "PrometheusRule"]
    rules_file = CHART / "files" / "prometheus" / "rules.yaml"
    assert rule["spec"] == load_yaml_all(rules_file.read_text()).__next__()
    monitors = {d["metadata"]["name"]: d for d in documents if d["kind"] == "PodMonitor"}
    servers = monitors["sectune-servers"]["spec"]
    assert servers["selector"]["matchExpressions"][0]["key"] == "sectune.io/adapterdeployment"
    assert servers["podMetricsEndpoints"][0]["port"] == "http"

    dashboards = [
        d for d in documents if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]
    ]
    assert len(dashboards) == 3
    for configmap in dashboards:
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        [(name, body)] = configmap["data"].items()
        assert json.loads(body)["uid"] == name.removesuffix(".json")


def test_single_alerts_are_turned_off_or_retuned_by_name():
    """monitoring.alerts changes one alert and leaves the others as shipped; runbookBaseUrl
    turns each runbook path into a runbook_url."""
    args = [tool("helm"), "template", "sectune", str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--kube-version", "1.37.2", "--api-versions", "monitoring.coreos.com/v1"]
    args += ["--set", "monitoring.alerts.SectuneGatesFailed.enabled=false"]
    args += ["--set", "monitoring.alerts.SectuneServingErrors.for=20m"]
    args += ["--set", "monitoring.alerts.SectuneServingErrors.labels.severity=page"]
    args += ["--set", "monitoring.runbookBaseUrl=https://wiki.example.com/sectune"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    [rule] = [d for d in load_yaml_all(text) if d and d["kind"] == "PrometheusRule"]
    shipped_groups = load_yaml_all(
        (CHART / "files" / "prometheus" / "rules.yaml").read_text()
    ).__next__()["groups"]
    rendered = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    shipped = {r["alert"]: r for g in shipped_groups for r in g["rules"] if "alert" in r}
    assert set(rendered) == set(shipped) - {"SectuneGatesFailed"}
    # Recording rules (live quality) are rendered as shipped.
    records = [r for g in rule["spec"]["groups"] for r in g["rules"] if "record" in r]
    assert records == [r for g in shipped_groups for r in g["rules"] if "record" in r]
    assert records
    errors = rendered["SectuneServingErrors"]
    assert errors["for"] == "20m" and errors["labels"] == {"severity": "page"}
    assert errors["expr"] == shipped["SectuneServingErrors"]["expr"]
    assert rendered["SectuneOperatorDown"]["for"] == shipped["SectuneOperatorDown"]["for"]
    for name, alert in rendered.items():
        assert alert["annotations"]["runbook_url"] == (
            f"https://wiki.example.com/sectune#{name.lower()}"
        )
        assert "runbook" not in alert["annotations"]
    for bad in ("monitoring.alerts.NotAnAlert.enabled=false",
                "monitoring.alerts.SectuneGatesFailed.for=soon",
                "monitoring.runbookBaseUrl=wiki"):  # fmt: skip
        with pytest.raises(subprocess.CalledProcessError):
            render(bad)


def _can(control_plane: Any, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    answer = control_plane.kubectl(*args)
    return answer.stdout.strip() == "yes"


def _apply_rendered(control_plane: Any, documents: list[dict[str, Any]], path: Path) -> None:
    path.write_text("\n---\n".join(json.dumps(d) for d in documents))
    applied = control_plane.kubectl("apply", "-f", str(path))
    assert applied.returncode == 0, applied.stderr


def test_rbac_is_exactly_enough_in_cluster_wide_and_namespaced_mode(
    control_plane, namespace, operator_kubeconfig, tmp_path
):
    # Cluster-wide (the default; installed for every cluster test by install_chart_rbac).
    sa = f"system:serviceaccount:{OPERATOR_NAMESPACE}:sectune-operator"
    allowed = [
        ("create", "jobs.batch", namespace),
        ("update", "deployments.apps", namespace),
        ("create", "poddisruptionbudgets.policy", namespace),
        ("get", "secrets", namespace),
        ("patch", "finetunejobs.sectune.io/status", namespace),
    ]
    refused = [
        ("list", "secrets", namespace),
        ("delete", "secrets", namespace),
        ("create", "pods", namespace),
        ("delete", "deployments.apps", namespace),
        ("delete", "jobs.batch", namespace),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
        ("create", "adapterdeployments.sectune.io", namespace),
        ("delete", "adapterdeployments.sectune.io", namespace),
    ]
    for verb, resource, ns in allowed:
        assert _can(control_plane, sa, verb, resource, ns), (
            f"cluster-wide: cannot {verb} {resource}"
        )
    for verb, resource, ns in refused:
        assert not _can(control_plane, sa, verb, resource, ns), (
            f"cluster-wide: may {verb} {resource}"
        )
    # the peering object is made at start-up when missing (the chart cannot render it)
    assert _can(control_plane, sa, "create", "clusterkopfpeerings.kopf.dev", None)

    # Namespaced: a release watching only this namespace.
    release = "sectune-ns"
    args = [tool("helm"), "template", release, str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--kube-version", "1.37.2", "--set", f"watchNamespaces={{{namespace}}}"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rbac = [
        d
        for d in load_yaml_all(text)
        if d
        and d["kind"]
        in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount")
        and not d["metadata"]["name"].endswith(("-view", "-edit"))
    ]
    assert sorted(d["kind"] for d in rbac) == [
        "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount",
    ]  # fmt: skip
    manifest = tmp_path / "namespaced-rbac.yaml"
    _apply_rendered(control_plane, rbac, manifest)
    try:
        account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
        sa = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}"
        for verb, resource, ns in allowed:
            assert _can(control_plane, sa, verb, resource, ns), (
                f"namespaced: cannot {verb} {resource}"
            )
        for verb, resource, ns in [
            *refused,
            ("patch", "configmaps", "kube-system"),
            ("create", "jobs.batch", "default"),
            ("get", "secrets", "default"),
            ("list", "namespaces", None),
            ("create", "deployments.apps", "default"),
        ]:
            assert not _can(control_plane, sa, verb, resource, ns), (
                f"namespaced: may {verb} {resource} in {ns}"
            )
        assert _can(
            control_plane, sa, "list", "customresourcedefinitions.apiextensions.k8s.io", None
        )
    finally:
        control_plane.kubectl("delete", "-f", str(manifest), "--ignore-not-found")


def test_view_edit_and_admin_users_get_sectune_resources(control_plane, namespace, tmp_path):
    aggregated = [
        d
        for d in render()
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith(("-view", "-edit"))
    ]
    assert len(aggregated) == 2
    _apply_rendered(control_plane, aggregated, tmp_path / "aggregated.yaml")
    for user, role in (("vera", "view"), ("eddie", "edit")):
        binding = tmp_path / f"{user}.yaml"
        binding.write_text(
            json.dumps(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": user, "namespace": namespace},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": role,
                    },
                    "subjects": [
                        {"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}
                    ],
                }
            )
        )
        assert control_plane.kubectl("apply", "-f", str(binding)).returncode == 0
    # kube-controller-manager's aggregation controller folds the rules into view/edit/admin.
    wait_until(
        lambda: _can(control_plane, "vera", "list", "finetunejobs.sectune.io", namespace),
        60,
        "view aggregates sectune resources",
    )
    assert _can(control_plane, "vera", "get", "adapterdeployments.sectune.io", namespace)
    assert not _can(control_plane, "vera", "create", "finetunejobs.sectune.io", namespace)
    wait_until(
        lambda: _can(control_plane, "eddie", "create", "adapterdeployments.sectune.io", namespace),
        60,
        "edit aggregates sectune resources",
    )
    assert _can(control_plane, "eddie", "delete", "finetunejobs.sectune.io", namespace)
    assert not _can(control_plane, "eddie", "patch", "finetunejobs.sectune.io/status", namespace)


def test_network_policies_toggle_gives_jobs_and_servers_their_policy(
    api_client, control_plane, namespace, tmp_path
):
    from support.operator import OperatorProcess

    release = "sectune-np"
    args = [tool("helm"), "template", release, str(CHART), "--namespace", OPERATOR_NAMESPACE]
    args += ["--kube-version", "1.37.2", "--set", "networkPolicies.enabled=true"]
    args += ["--set", "networkPolicies.apiNamespaces={soc-tools}"]
    documents = [
        d
        for d in load_yaml_all(
            subprocess.run(args, capture_output=True, text=True, check=True).stdout
        )
        if d
    ]
    rbac = [
        d
        for d in documents
        if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "ServiceAccount")
        and not d["metadata"]["name"].endswith(("-view", "-edit"))
    ]
    manifest = tmp_path / "np-rbac.yaml"
    _apply_rendered(control_plane, rbac, manifest)
    operator = None
    try:
        core = client.CoreV1Api(api_client)
        account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]["name"]
        token = core.create_namespaced_service_account_token(
            account, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        kubeconfig = control_plane.token_kubeconfig(token, tmp_path / "np.kubeconfig")
        container = _deployment(documents)["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
        chosen = {
            k: v
            for k, v in env.items()
            if k.startswith(("SECTUNE_NETWORK", "SECTUNE_API", "SECTUNE_MONITORING"))
        }
        assert chosen["SECTUNE_NETWORK_POLICIES"] == "true"
        operator = OperatorProcess(
            kubeconfig,
            tmp_path,
            env={
                **chosen,
                "SECTUNE_WATCH": namespace,
                "SECTUNE_OPERATOR_NAMESPACE": OPERATOR_NAMESPACE,
            },
        ).start()
        _ftj(api_client, namespace, "guarded")
        serving = {
            "apiVersion": "sectune.io/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "guarded"},
            "spec": {
                "baseModel": {"uri": "s3://models/smollm2"},
                "adapters": [
                    {
                        "name": "triage",
                        "versions": [
                            {
                                "version": "v1",
                                "source": {"uri": "s3://a/t/versions/r", "sha256": "ab" * 32},
                            }
                        ],
                    }
                ],
            },
        }
        client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            "sectune.io", "v1alpha1", namespace, "adapterdeployments", serving
        )
        networking = client.NetworkingV1Api(api_client)

        def policies() -> dict[str, Any]:
            items = networking.list_namespaced_network_policy(namespace).items
            return {p.metadata.name: p for p in items}

        wait_until(
            lambda: {"guarded-train", "guarded-serve"} <= set(policies()), 60, "NetworkPolicies"
        )
        training = policies()["guarded-train"]
        assert training.spec.pod_selector.match_labels == {"sectune.io/finetunejob": "guarded"}
        assert training.metadata.owner_references[0].kind == "FineTuneJob"
        server = policies()["guarded-serve"]
        sources = server.spec.ingress[0]._from
        names = [
            s.namespace_selector.match_expressions[0].values
            for s in sources
            if s.namespace_selector
        ]
        assert names == [["soc-tools"], ["monitoring", OPERATOR_NAMESPACE]]
    finally:
        if operator is not None:
            operator.stop()
        control_plane.kubectl("delete", "-f", str(manifest), "--ignore-not-found")


def test_the_cluster_example_applies_as_is_after_the_upload(
    api_client, namespace, control_plane, start_operator, s3_server, tmp_path
):
    """examples/cluster: upload with the shipped script (no flags), then the FineTuneJob applies
    unchanged and the operator runs it (file:// examples are refused in a cluster)."""
    root = CHART.parents[1]
    uploaded = subprocess.run(
        [sys.executable, str(root / "hack" / "upload_example.py")],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_server.env()},
        timeout=900,
    )
    assert uploaded.returncode == 0, uploaded.stdout[-2000:] + uploaded.stderr[-2000:]
    s3 = s3_server.client()
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="sectune-example")["Contents"]}
    data = root / "examples" / "attack-tactics" / "data"
    for name in ("train.jsonl", "validation.jsonl", "NOTICE.md"):
        assert keys[f"data/attack-tactics/{name}"] == (data / name).stat().st_size
    assert "models/SmolLM2-135M-Instruct/config.json" in keys
    assert any(k.endswith(".safetensors") for k in keys)

    secret = {"metadata": {"name": "sectune-storage"}, "stringData": s3_server.env()}
    client.CoreV1Api(api_client).create_namespaced_secret(namespace, secret)
    endpoint = s3_server.env()["AWS_ENDPOINT_URL"]
    start_operator(env={"SECTUNE_STORAGE_ENDPOINTS": endpoint})
    for example in ("finetunejob.yaml", "adapterdeployment.yaml"):
        path = root / "examples" / "cluster" / example
        applied = control_plane.kubectl("apply", "-n", namespace, "-f", str(path))
        assert applied.returncode == 0, applied.stderr
    batch = client.BatchV1Api(api_client)
    wait_until(lambda: batch.list_namespaced_job(namespace).items, 60, "training Job")
    [training] = batch.list_namespaced_job(namespace).items
    from sectune_operator.builders.finetunejob import pod_trainer_config

    job = pod_trainer_config(training.spec.template.metadata.annotations)["spec"]
    for uri in (job["baseModel"]["uri"], job["dataset"]["train"], job["dataset"]["validation"]):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        assert bucket == "sectune-example" and (key in keys or f"{key}/config.json" in keys), uri

    def waiting_for_the_job() -> bool:
        status = (
            client.CustomObjectsApi(api_client)
            .get_namespaced_custom_object(
                "sectune.io", "v1alpha1", namespace, "adapterdeployments", "attack-tactics"
            )
            .get("status", {})
        )
        return any(
            c["type"] == "VersionsResolved" and c["reason"] == "JobNotSucceeded"
            for c in status.get("conditions", [])
        )

    wait_until(waiting_for_the_job, 30, "the AdapterDeployment waits for its FineTuneJob")


def test_rendered_manifests_pass_checkov(tmp_path):
    """The chart (defaults, and with monitoring and network policies on) and what the operator
    renders for a FineTuneJob and an AdapterDeployment pass checkov's Kubernetes checks; every
    exception is explained in a checkov.io/skip annotation on the resource."""
    from sectune.yamlio import dump_yaml_all
    from sectune_operator.api import AdapterDeploymentSpec, FineTuneJobSpec
    from sectune_operator.builders import adapterdeployment, finetunejob
    from sectune_operator.settings import Settings

    settings = Settings(network_policies=True)
    job = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "task": {"labels": ["benign", "malicious"]},
            "resources": {"gpus": 1},
            "output": {"uri": "s3://adapters", "credentials": {"name": "storage"}},
        }
    )
    serving = AdapterDeploymentSpec.model_validate(
        {
            "baseModel": {"uri": "s3://models/base"},
            "adapters": [
                {"name": "t", "versions": [{"version": "v1", "source": {"fineTuneJob": "j"}}]}
            ],
            "replicas": 2,
            "credentials": {"name": "storage"},
            "authSecret": {"name": "keys"},
        }
    )
    # vLLM with its fetching init container and observer sidecar, and a feedback store (the
    # peers Service and the pod's own address).
    gpu = AdapterDeploymentSpec.model_validate(
        serving.model_dump(by_alias=True) | {"runtime": "vllm", "resources": {"gpus": 1}}
    )
    judged = AdapterDeploymentSpec.model_validate(
        serving.model_dump(by_alias=True) | {"feedback": {"store": "s3://verdicts/soc"}}
    )
    resolved = {("t", "v1"): adapterdeployment.Resolved("s3://adapters/j/versions/r", "ab" * 32)}
    config = adapterdeployment.render_serving_config(serving, resolved, set(), None).config
    assert config is not None
    children = [
        finetunejob.build_job("j", job, settings),
        finetunejob.build_network_policy("j", settings),
        adapterdeployment.build_configmap("soc", config),
        adapterdeployment.build_service("soc"),
        adapterdeployment.build_service("soc", peers=True),
        adapterdeployment.build_pdb("soc"),
    ]
    for name, spec in (("soc", serving), ("gpu", gpu), ("judged", judged)):
        children.append(adapterdeployment.build_deployment(name, spec, config, settings))
        children.append(adapterdeployment.build_network_policy(name, spec, settings))
    for child in children:
        child["metadata"]["namespace"] = "soc"
    (tmp_path / "children.yaml").write_text(dump_yaml_all(children))
    for values, name in (
        ((), "defaults.yaml"),
        (("networkPolicies.enabled=true", "monitoring.prometheusOperator=true"), "everything.yaml"),
    ):
        (tmp_path / name).write_text(dump_yaml_all(render(*values)))
    for name in ("children.yaml", "defaults.yaml", "everything.yaml"):
        checked = subprocess.run(
            [tool("checkov"), "-f", str(tmp_path / name), "--framework", "kubernetes",
             "--compact", "--quiet", "--skip-download"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert checked.returncode == 0, f"{name}:\n{checked.stdout[-4000:]}"
        assert "Failed checks: 0" in checked.stdout, checked.stdout[-4000:]


@pytest.mark.parametrize("other_kopf_operator", [False, True], ids=["fresh", "beside-kopf"])
def test_helm_install_upgrade_and_uninstall_with_the_default_values(tmp_path, other_kopf_operator):
    """`helm install` as a platform team runs it, into a cluster of its own (fresh, or where
    another kopf-based operator already installed kopf's peering CRDs): installs, upgrades
    with a changed CRD, uninstalls keeping the CRDs (and so every FineTuneJob), and installs
    again."""
    import shutil

    from support.controlplane import ControlPlane

    plane = ControlPlane(tmp_path / "plane").start()
    helm = [tool("helm"), "--kubeconfig", str(plane.kubeconfig), "-n", "sectune-system"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*helm, *args], capture_output=True, text=True, timeout=300)

    try:
        if other_kopf_operator:
            theirs = tmp_path / "kopf-crds.yaml"
            theirs.write_text(
                "\n---\n".join((ROOT / "crds" / f"kopf.dev_{n}.yaml").read_text()
                               for n in ("clusterkopfpeerings", "kopfpeerings"))
            )  # fmt: skip
            assert plane.kubectl("apply", "-f", str(theirs)).returncode == 0

        def kopf_owner() -> str | None:
            kopf = plane.kubectl("get", "crd", "clusterkopfpeerings.kopf.dev", "-o", "json")
            assert kopf.returncode == 0, kopf.stderr
            annotations = json.loads(kopf.stdout)["metadata"].get("annotations") or {}
            return annotations.get("meta.helm.sh/release-name")

        installed = run("install", "sectune", str(CHART), "--create-namespace")
        assert installed.returncode == 0, installed.stderr
        assert "sectune 0.1.0 is installed in sectune-system" in installed.stdout  # NOTES.txt
        assert (
            "Canary analysis is off until canaryAnalysis.prometheusUrl is set" in installed.stdout
        )
        for crd in ("finetunejobs", "adapterdeployments", "finetuneschedules"):
            established = plane.kubectl(
                "wait", "--for=condition=Established", f"crd/{crd}.sectune.io", "--timeout=60s"
            )
            assert established.returncode == 0, established.stderr
        # kopf's CRDs: left to the operator that installed them, or installed by this release
        assert kopf_owner() == (None if other_kopf_operator else "sectune")
        deployed = plane.kubectl("get", "deployment", "-n", "sectune-system", "-o", "name")
        assert deployed.stdout.strip() == "deployment.apps/sectune"

        # An upgrade that changes a CRD (a new printer column) updates it in place.
        changed = tmp_path / "chart"
        shutil.copytree(CHART, changed)
        path = changed / "files" / "crds" / "sectune.io_finetunejobs.yaml"
        text = path.read_text()
        path.write_text(
            text.replace(
                "additionalPrinterColumns:\n",
                "additionalPrinterColumns:\n    - {name: Upgraded, type: string, "
                "jsonPath: .spec.task.type}\n",
                1,
            )
        )
        upgraded = run("upgrade", "sectune", str(changed))
        assert upgraded.returncode == 0, upgraded.stderr
        columns = plane.kubectl(
            "get", "crd", "finetunejobs.sectune.io",
            "-o", "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}",
        )  # fmt: skip
        assert "Upgraded" in columns.stdout.split()
        assert kopf_owner() == (None if other_kopf_operator else "sectune")  # not dropped

        uninstalled = run("uninstall", "sectune")
        assert uninstalled.returncode == 0, uninstalled.stderr
        assert plane.kubectl("get", "crd", "finetunejobs.sectune.io").returncode == 0
        gone = plane.kubectl("get", "deployment", "-n", "sectune-system", "-o", "name")
        assert gone.stdout.strip() == ""

        again = run("install", "sectune", str(CHART))
        assert again.returncode == 0, again.stderr
    finally:
        plane.stop()
