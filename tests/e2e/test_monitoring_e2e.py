"""Monitoring as a platform team installs it: the chart's ServiceMonitor, PodMonitors and
PrometheusRule handed to the real Prometheus Operator (built from its Go module) running
against the test control plane; the scrape configuration and rule file it generates, loaded
as generated into a real Prometheus; the real operator and server processes scraped behind
them. The first failure in a tenant's namespace alerts with that namespace, and the servers'
own labels survive the Operator's relabelling.

Debian's Prometheus is built without Kubernetes discovery, so each job's `kubernetes_sd_configs`
becomes static targets carrying the `__meta_kubernetes_*` labels Kubernetes discovery gives the
same pods, Services and EndpointSlices, read from the API server (`discovered`); every
relabelling rule the Operator generated runs unchanged in Prometheus."""

from __future__ import annotations

import base64
import gzip
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from sectune.yamlio import dump_yaml, load_yaml, load_yaml_all
from support.kube import create_job, finish_job
from support.operator import CHART
from support.processes import TOOL_BIN, Server, free_port, tool, wait_until
from support.prometheus import PrometheusServer
from support.serving import start_server
from support.trained import Trained
from support.vllm_contract import VllmContract

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]

MONITORING = "monitoring"
RELEASE_NAMESPACE = "sectune-system"
GROUP, VERSION = "monitoring.coreos.com", "v1"


def _chart_objects() -> list[dict[str, Any]]:
    """The release as `helm install` renders it where the Prometheus Operator is installed."""
    args = [tool("helm"), "template", "sectune", str(CHART), "--namespace", RELEASE_NAMESPACE]
    args += ["--kube-version", "1.37.2", "--api-versions", f"{GROUP}/{VERSION}"]
    args += ["--set", "monitoring.interval=2s"]
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in load_yaml_all(text) if d]


def _apply(plane: Any, documents: list[dict[str, Any]], path: Path) -> None:
    path.write_text("\n---\n".join(dump_yaml(d) for d in documents))
    applied = plane.kubectl("apply", "--server-side", "-f", str(path))
    assert applied.returncode == 0, applied.stderr


def _namespace(core: client.CoreV1Api, name: str) -> None:
    if not [n for n in core.list_namespace().items if n.metadata.name == name]:
        core.create_namespace({"metadata": {"name": name}})


@pytest.fixture
def prometheus_operator(control_plane, api_client, tmp_path):  # type: ignore[no-untyped-def]
    """The Prometheus Operator's CRDs installed and the operator running, with a Prometheus
    that selects every ServiceMonitor, PodMonitor and PrometheusRule (as kube-prometheus-stack
    can be set to) and discovers through EndpointSlices."""
    crds = (TOOL_BIN / "prometheus-operator-crds").resolve()
    applied = control_plane.kubectl("apply", "--server-side", "-f", str(crds))
    assert applied.returncode == 0, applied.stderr
    established = control_plane.kubectl(
        "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"
    )
    assert established.returncode == 0, established.stderr
    core = client.CoreV1Api(api_client)
    _namespace(core, MONITORING)
    server = Server(
        "prometheus-operator",
        [
            tool("prometheus-operator"),
            "--web.listen-address=127.0.0.1:" + str(free_port()),
            "--prometheus-config-reloader=quay.io/prometheus-operator/prometheus-config-reloader",
        ],
        tmp_path / "prometheus-operator.log",
        env={"KUBECONFIG": str(control_plane.kubeconfig)},
    ).start()
    name = f"k8s-{tmp_path.name[-8:].lower().replace('_', '-')}"
    spec = {
        "serviceDiscoveryRole": "EndpointSlice",
        "scrapeInterval": "2s",
        "evaluationInterval": "1s",
        **{f"{kind}Selector": {} for kind in ("serviceMonitor", "podMonitor", "rule")},
        **{f"{kind}NamespaceSelector": {} for kind in ("serviceMonitor", "podMonitor", "rule")},
    }
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, MONITORING, "prometheuses",
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Prometheus",
         "metadata": {"name": name}, "spec": spec},
    )  # fmt: skip
    try:
        yield name
    finally:
        server.stop()
        client.CustomObjectsApi(api_client).delete_namespaced_custom_object(
            GROUP, VERSION, MONITORING, "prometheuses", name
        )


def _generated(core: client.CoreV1Api, name: str, jobs: int) -> tuple[dict[str, Any], str]:
    """The scrape configuration (once it holds `jobs` jobs) and rule file the Operator wrote."""
    found: dict[str, Any] = {}

    def written() -> bool:
        try:
            secret = core.read_namespaced_secret(f"prometheus-{name}", MONITORING)
        except client.ApiException:
            return False
        config = load_yaml(gzip.decompress(base64.b64decode(secret.data["prometheus.yaml.gz"])))
        found["config"] = config
        return len(config.get("scrape_configs") or []) >= jobs

    wait_until(written, 120, "the Prometheus Operator's scrape configuration")
    rules = core.read_namespaced_config_map(f"prometheus-{name}-rulefiles-0", MONITORING)
    [(_, rule_file)] = [(k, v) for k, v in rules.data.items() if "sectune" in k]
    return found["config"], rule_file


def _name(label: str) -> str:
    """A Kubernetes label key as Prometheus discovery spells it in a label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _labels(prefix: str, labels: dict[str, str] | None) -> dict[str, str]:
    out = {}
    for key, value in (labels or {}).items():
        out[f"{prefix}_label_{_name(key)}"] = value
        out[f"{prefix}_labelpresent_{_name(key)}"] = "true"
    return out


def _pod_meta(pod: Any, container: Any, port: Any) -> dict[str, str]:
    return {
        "__meta_kubernetes_namespace": pod.metadata.namespace,
        "__meta_kubernetes_pod_name": pod.metadata.name,
        "__meta_kubernetes_pod_ip": pod.status.pod_ip,
        "__meta_kubernetes_pod_phase": pod.status.phase,
        "__meta_kubernetes_pod_node_name": pod.spec.node_name or "",
        "__meta_kubernetes_pod_container_name": container.name,
        "__meta_kubernetes_pod_container_port_name": port.name or "",
        "__meta_kubernetes_pod_container_port_number": str(port.container_port),
        **_labels("__meta_kubernetes_pod", pod.metadata.labels),
    }


def discovered(sd: dict[str, Any], api_client: Any) -> list[dict[str, Any]]:
    """Static targets with the labels Kubernetes discovery (role pod or endpointslice) gives
    the objects the API server holds now, as Prometheus documents them."""
    core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
    names = (sd.get("namespaces") or {}).get("names")
    namespaces = names or [n.metadata.name for n in core.list_namespace().items]
    targets = []
    for ns in namespaces:
        pods = {p.metadata.name: p for p in core.list_namespaced_pod(ns).items if p.status.pod_ip}
        if sd["role"] == "pod":
            for pod in pods.values():
                for container in pod.spec.containers:
                    for port in container.ports or []:
                        address = f"{pod.status.pod_ip}:{port.container_port}"
                        targets.append(
                            {"targets": [address], "labels": _pod_meta(pod, container, port)}
                        )
        elif sd["role"] == "endpointslice":
            for eps in discovery.list_namespaced_endpoint_slice(ns).items:
                service_name = eps.metadata.labels.get("kubernetes.io/service-name", "")
                service = core.read_namespaced_service(service_name, ns)
                for endpoint in eps.endpoints or []:
                    ref = endpoint.target_ref
                    for port in eps.ports or []:
                        labels = {
                            "__meta_kubernetes_namespace": ns,
                            "__meta_kubernetes_endpointslice_name": eps.metadata.name,
                            "__meta_kubernetes_endpointslice_port_name": port.name or "",
                            "__meta_kubernetes_endpointslice_port": str(port.port),
                            "__meta_kubernetes_endpointslice_address_target_kind": ref.kind
                            if ref
                            else "",
                            "__meta_kubernetes_endpointslice_address_target_name": ref.name
                            if ref
                            else "",
                            "__meta_kubernetes_service_name": service_name,
                            **_labels("__meta_kubernetes_service", service.metadata.labels),
                        }
                        pod = pods.get(ref.name) if ref and ref.kind == "Pod" else None
                        if pod is not None:
                            container = pod.spec.containers[0]
                            labels |= _pod_meta(pod, container, (container.ports or [port])[0])
                        address = f"{endpoint.addresses[0]}:{port.port}"
                        targets.append({"targets": [address], "labels": labels})
        else:
            raise AssertionError(f"discovery role {sd['role']} not expected from the chart")
    return targets


def _behind(config: dict[str, Any], api_client: Any, addresses: dict[str, str]) -> list[Any]:
    """The generated jobs as this Prometheus runs them: discovered targets as static ones,
    the config reloader's placeholders filled, and each pod's address (`pod`, or `pod;port`
    for one container port) pointed at the real process playing it (kwok's pod IPs route
    nowhere). Every relabelling rule the Operator generated is kept as it is."""
    jobs = []
    for job in config["scrape_configs"]:
        job["static_configs"] = [
            target
            for sd in job.pop("kubernetes_sd_configs", [])
            for target in discovered(sd, api_client)
        ]
        for rule in job.get("relabel_configs", []):
            if rule.get("regex") == "$(SHARD);|.+;.+":
                rule["regex"] = "0;|.+;.+"
        job["relabel_configs"] = [
            *job.get("relabel_configs", []),
            *(
                {
                    "source_labels": [
                        "__meta_kubernetes_pod_name",
                        "__meta_kubernetes_pod_container_port_number",
                    ],
                    "regex": pod if ";" in pod else f"{pod};.*",
                    "target_label": "__address__",
                    "replacement": address,
                }
                for pod, address in addresses.items()
            ),
        ]
        jobs.append(job)
    return jobs


def test_the_first_failure_alerts_with_the_tenants_namespace_as_the_operator_scrapes_it(
    control_plane,
    api_client,
    namespace,
    start_operator,
    prometheus_operator,
    trained: Trained,
    tmp_path,
):
    core = client.CoreV1Api(api_client)
    _namespace(core, RELEASE_NAMESPACE)
    chart = _chart_objects()
    monitors = [d for d in chart if d["apiVersion"] == f"{GROUP}/{VERSION}"]
    assert sorted(d["kind"] for d in monitors) == [
        "PodMonitor", "PodMonitor", "PrometheusRule", "ServiceMonitor",
    ]  # fmt: skip
    # The operator's pods and Service as the chart renders them (kwok runs the pods).
    operator_objects = [
        d for d in chart if d["kind"] in ("Deployment", "Service", "ServiceAccount")
    ]
    _apply(control_plane, [*operator_objects, *monitors], tmp_path / "release.yaml")
    # A server pod of an AdapterDeployment in the tenant's namespace (kwok runs it).
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": "soc-serve-7d9f8b6c4-x2x9z",
                "labels": {"sectune.io/adapterdeployment": "soc"},
            },
            "spec": {
                "containers": [
                    {
                        "name": "server",
                        "image": "sectune",
                        "ports": [{"name": "http", "containerPort": 8000}],
                    }
                ]
            },
        },
    )

    def running(ns: str, selector: str) -> list[str]:
        pods = core.list_namespaced_pod(ns, label_selector=selector).items
        return [p.metadata.name for p in pods if p.status.phase == "Running" and p.status.pod_ip]

    wait_until(
        lambda: running(RELEASE_NAMESPACE, "app.kubernetes.io/name=sectune-operator"),
        60,
        "operator pods",
    )
    wait_until(lambda: running(namespace, "sectune.io/adapterdeployment=soc"), 60, "server pod")
    # And a vLLM pod: vLLM on a port of its own, the router sidecar on the API and metrics ports.
    vllm_pod = "gpu-serve-5c8d7f9b6-q7w2k"
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": vllm_pod,
                "labels": {"sectune.io/adapterdeployment": "gpu", "sectune.io/runtime": "vllm"},
            },
            "spec": {
                "containers": [
                    {"name": "server", "image": "vllm",
                     "ports": [{"name": "vllm", "containerPort": 8001}]},
                    {"name": "router", "image": "sectune",
                     "ports": [{"name": "http", "containerPort": 8000},
                               {"name": "metrics", "containerPort": 9400}]},
                ]
            },
        },
    )  # fmt: skip
    wait_until(lambda: running(namespace, "sectune.io/adapterdeployment=gpu"), 60, "vLLM pod")

    # The real processes behind them.
    operator = start_operator()
    server = start_server(tmp_path, ["--adapter", f"triage={trained.prefix}/triage"], trained.env)
    vllm, router = _vllm_replica(tmp_path)
    try:
        addresses = {
            pod: operator.metrics_url.split("/")[2]
            for pod in running(RELEASE_NAMESPACE, "app.kubernetes.io/name=sectune-operator")
        }
        addresses["soc-serve-7d9f8b6c4-x2x9z"] = server.url.removeprefix("http://")
        addresses[f"{vllm_pod};8001"] = vllm.url.removeprefix("http://")
        addresses[f"{vllm_pod};8000"] = router.api_url.removeprefix("http://")
        addresses[f"{vllm_pod};9400"] = router.url.removeprefix("http://")
        slices = client.DiscoveryV1Api(api_client)
        wait_until(
            lambda: any(
                e.endpoints for e in slices.list_namespaced_endpoint_slice(RELEASE_NAMESPACE).items
            ),
            60,
            "the operator Service's EndpointSlice",
        )
        config, rule_file = _generated(core, prometheus_operator, jobs=4)
        rules = tmp_path / "rules.yaml"
        rules.write_text(rule_file)
        prometheus = PrometheusServer(tmp_path / "prometheus").start(
            _behind(config, api_client, addresses), [rules]
        )
        try:
            # Before any failure the counters have no series; then one job fails its gates.
            for text in ("mimikatz lsass dump", "backup completed"):
                assert server.classify("triage", text).status_code == 200
            wait_until(
                lambda: prometheus.query(f'up{{namespace="{RELEASE_NAMESPACE}"}} == 1'),
                60, "the operator scraped through the ServiceMonitor",
            )  # fmt: skip
            _secret = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
            core.create_namespaced_secret(
                namespace, {"metadata": {"name": "storage"}, "stringData": _secret}
            )
            create_job(api_client, namespace, "triage")
            finish_job(api_client, namespace, "triage", "ab" * 32, gates_passed=False)

            def firing(alert: str) -> list[dict[str, Any]]:
                return prometheus.query(f'ALERTS{{alertname="{alert}",alertstate="firing"}}')

            wait_until(lambda: firing("SectuneGatesFailed"), 90, "SectuneGatesFailed firing")
            [alert] = firing("SectuneGatesFailed")
            assert alert["metric"]["namespace"] == namespace  # the tenant's, not sectune-system
            failures = prometheus.query("sectune_operator_gate_failures_total")
            assert {r["metric"]["namespace"] for r in failures} == {namespace}
            assert not any("exported_namespace" in r["metric"] for r in failures)

            # The servers keep their own endpoint label under the Operator's relabelling.
            served = prometheus.query('sectune_serve_requests_total{adapter="triage"}')
            assert {r["metric"]["endpoint"] for r in served} == {"classify"}
            assert {r["metric"]["namespace"] for r in served} == {namespace}
            assert all(r["metric"]["adapterdeployment"] == "soc" for r in served)

            # Each server pod is one target: a sectune server on its API port, a vLLM pod on
            # its router's metrics port, which reports what vLLM serves, counts each version's
            # requests and passes vLLM's series through (scraping vLLM's port as well would
            # count every vLLM series twice).
            chat = {"model": "triage", "messages": [{"role": "user", "content": "lsass dump"}]}
            answered = httpx.post(f"{router.api_url}/v1/chat/completions", json=chat, timeout=10)
            assert answered.json()["model"] == "triage@v1"
            wait_until(
                lambda: prometheus.query('sectune_serve_requests_total{adapterdeployment="gpu"}'),
                60, "the vLLM pod's router scraped",
            )  # fmt: skip
            [routed] = prometheus.query('sectune_serve_requests_total{adapterdeployment="gpu"}')
            assert {k: routed["metric"][k] for k in ("version", "endpoint", "routing", "pod")} == {
                "version": "v1", "endpoint": "chat", "routing": "traffic", "pod": vllm_pod
            }  # fmt: skip
            targets = prometheus.query(f'up{{namespace="{namespace}"}}')
            assert sorted(r["metric"]["pod"] for r in targets) == sorted(
                ["soc-serve-7d9f8b6c4-x2x9z", vllm_pod]
            )
            [info] = prometheus.query('sectune_serve_adapter_info{adapterdeployment="gpu"}')
            assert (info["metric"]["version"], info["metric"]["traffic"]) == ("v1", "100")
            [success] = prometheus.query("vllm:request_success_total")
            assert success["metric"]["pod"] == vllm_pod
            assert success["metric"]["adapterdeployment"] == "gpu"
        finally:
            prometheus.stop()
    finally:
        server.stop()
        router.stop()
        vllm.stop()


@dataclass
class _Router:
    process: Server
    url: str
    """Its metrics port."""
    api_url: str

    def stop(self) -> None:
        self.process.stop()


def _vllm_replica(tmp_path: Path) -> tuple[VllmContract, _Router]:
    """vLLM played by its documented answers, and the real router sidecar in front of it."""
    adapter = "/adapters/triage/v1/adapter"
    command = ["vllm", "serve", "/adapters/base", "--served-model-name", "base",
               "--lora-modules", f"triage@v1={adapter}"]  # fmt: skip
    vllm = VllmContract(command).start()
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "verified.json").write_text(
        json.dumps([{"adapter": "triage", "version": "v1", "sha256": "c" * 64, "path": adapter}])
    )
    config = tmp_path / "serving.yaml"
    config.write_text(
        dump_yaml(
            {"adapters": [{"name": "triage", "versions": [
                {"version": "v1", "uri": "s3://b/triage/versions/r1", "sha256": "c" * 64}
            ]}]}
        )
    )  # fmt: skip
    port, api_port = free_port(), free_port()
    process = Server(
        "router",
        [sys.executable, "-m", "sectune.cli", "route-vllm", "--config", str(config),
         "--adapters", str(adapters), "--vllm-url", vllm.url, "--host", "127.0.0.1",
         "--port", str(api_port), "--metrics-port", str(port)],
        tmp_path / "router.log",
    ).start()  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    process.wait_http(url + "/ready")
    return vllm, _Router(process, url, f"http://127.0.0.1:{api_port}")
