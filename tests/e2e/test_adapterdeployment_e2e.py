"""An AdapterDeployment end to end: the operator renders it on the real control plane, the
rendered server command runs as two local processes (the replicas kwok plays) reading the file
the ConfigMap holds, against the real S3 server, scraped by the real Prometheus.

`kubectl apply` of a new version hot-swaps every replica with zero failed requests and the
status reports what the replicas serve; a canary past its bound is rolled back automatically
from Prometheus' figures."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from sectune.yamlio import dump_yaml
from support.processes import wait_until
from support.trained import Trained

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e, pytest.mark.cluster]

GROUP, VERSION = "sectune.io", "v1alpha1"
KEY = "e2e-client-key-0123456789abcdef"
TEXT = "mimikatz lsass dump beacon by user=<USER_1> from <IP_1>"


def _manifest(
    trained: Trained, model_dir: Path, triage: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    def pinned(version: str, source: Any, traffic: int) -> dict[str, Any]:
        return {
            "version": version,
            "source": {"uri": source.uri, "sha256": source.sha256},
            "traffic": traffic,
        }

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterDeployment",
        "metadata": {"name": "soc"},
        "spec": {
            "baseModel": {"uri": f"file://{model_dir}"},
            "adapters": [
                {"name": "triage", "versions": [pinned(*t) for t in triage]},
                {"name": "other", "versions": [pinned("v1", trained.other, 100)]},
            ],
            "replicas": 2,
            "credentials": {"name": "storage"},
            "authSecret": {"name": "soc-keys"},
            **spec,
        },
    }


def _status(api_client: Any, namespace: str) -> dict[str, Any]:
    body = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", "soc"
    )
    return body.get("status") or {}


def _serves(api_client: Any, namespace: str, triage: dict[str, str]) -> bool:
    """Ready, with every replica serving exactly these triage versions (version -> sha256)."""
    status = _status(api_client, namespace)
    active = {
        a["version"]: a["sha256"] for a in status.get("activeAdapters", []) if a["name"] == "triage"
    }
    return status.get("phase") in ("Ready", "Degraded") and active == triage


def _apply(control_plane: Any, namespace: str, document: dict[str, Any], workdir: Path) -> None:
    path = workdir / "adapterdeployment.yaml"
    path.write_text(dump_yaml(document))
    applied = control_plane.kubectl("apply", "-n", namespace, "-f", str(path))
    assert applied.returncode == 0, applied.stderr


def _secrets(api_client: Any, namespace: str, trained: Trained, keys: dict[str, str]) -> Any:
    """The storage Secret and the API keys Secret `soc-keys`; the CoreV1Api they went through."""
    core = client.CoreV1Api(api_client)
    for name, data in (("storage", trained.env), ("soc-keys", keys)):
        core.create_namespaced_secret(namespace, {"metadata": {"name": name}, "stringData": data})
    return core


def _classify(url: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify",
        json={"model": model, "input": TEXT},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


def test_apply_hot_swaps_every_replica_and_a_bad_canary_is_rolled_back(
    api_client,
    namespace,
    control_plane,
    start_operator,
    kubelet,
    prometheus,
    trained,
    tiny_model_dir,
    tmp_path,
):
    core = _secrets(
        api_client, namespace, trained, {"api-keys": f"# SOC tools\nsoc-console {KEY}\n"}
    )
    operator = start_operator(
        env={
            "SECTUNE_SERVING_METRICS_URL": kubelet.network.url_template,
            "SECTUNE_PROMETHEUS_URL": "",  # set below, once Prometheus scrapes the replicas
            "SECTUNE_ALLOW_FILE_URIS": "true",
        }
    )
    _apply(
        control_plane,
        namespace,
        _manifest(trained, tiny_model_dir, [("v1", trained.triage_v1, 100)]),
        tmp_path,
    )

    wait_until(kubelet.sync_once, 30, "rendered ConfigMap")
    apps = client.AppsV1Api(api_client)
    deployment = apps.read_namespaced_deployment("soc-serve", namespace)

    def running() -> list[str]:
        pods = core.list_namespaced_pod(
            namespace, label_selector="sectune.io/adapterdeployment=soc"
        ).items
        return sorted(p.metadata.name for p in pods if p.status.phase == "Running")

    wait_until(lambda: len(running()) == 2, 60, "two server pods")
    for pod in running():
        kubelet.start_pod(pod, deployment)
    for server, url in kubelet.replicas.values():
        server.wait_http(f"{url}/readyz", timeout=180)
    threading.Thread(target=kubelet.sync_forever, daemon=True).start()
    wait_until(
        lambda: _serves(api_client, namespace, {"v1": trained.triage_v1.sha256}), 60, "v1 served"
    )
    assert _status(api_client, namespace)["revision"] == 1

    # A client keeps asking both replicas for both adapters while v2 is applied.
    failures: list[str] = []
    answered: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        while not stop.is_set():
            for _, url in kubelet.replicas.values():
                for model in ("triage", "other"):
                    response = _classify(url, model)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        answered.append(response.headers["x-sectune-model"])

    loop = threading.Thread(target=client_loop)
    loop.start()
    try:
        _apply(
            control_plane,
            namespace,
            _manifest(trained, tiny_model_dir, [("v2", trained.triage_v2, 100)]),
            tmp_path,
        )
        wait_until(
            lambda: _serves(api_client, namespace, {"v2": trained.triage_v2.sha256}),
            90,
            "v2 served",
        )
        time.sleep(1)
    finally:
        stop.set()
        loop.join()
    assert failures == []
    assert "triage@v1" in answered and answered[-4:].count("triage@v2") == 2
    for _, url in kubelet.replicas.values():
        assert _classify(url, "triage").headers["x-sectune-model"] == "triage@v2"
    status = _status(api_client, namespace)
    assert (
        status["revision"] == 2
        and status["history"][-1]["adapters"] == "triage v2 100%; other v1 100%"
    )

    # Every request is in the access log as one JSON line naming the caller's key id, never the key.
    _, first = next(iter(kubelet.replicas.items()))
    log = first[0].log_path.read_text()
    assert KEY not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
    assert lines and all(line["key"] == "soc-console" and line["status"] == 200 for line in lines)
    assert {(line["adapter"], line["version"]) for line in lines} >= {
        ("triage", "v2"),
        ("other", "v1"),
    }

    # Canary: v1 back at 50 % with a p95 bound below anything it can measure -> rolled back.
    prometheus.start(
        [
            {
                "job_name": "sectune-serve",
                "static_configs": [
                    {
                        "targets": [url.removeprefix("http://")],
                        "labels": {"namespace": namespace, "pod": pod},
                    }
                    for pod, (_, url) in kubelet.replicas.items()
                ],
            }
        ]
    )
    operator.stop()
    operator = start_operator(
        name="operator-with-prometheus",
        env={
            "SECTUNE_SERVING_METRICS_URL": kubelet.network.url_template,
            "SECTUNE_PROMETHEUS_URL": prometheus.url,
            "SECTUNE_ALLOW_FILE_URIS": "true",
        },
    )
    canary = _manifest(
        trained,
        tiny_model_dir,
        [("v2", trained.triage_v2, 50), ("v1", trained.triage_v1, 50)],
        promotion={"rollback": {"windowMinutes": 1, "minRequests": 10, "maxLatencyP95Ms": 1}},
    )
    _apply(control_plane, namespace, canary, tmp_path)
    wait_until(
        lambda: _serves(
            api_client, namespace, {"v2": trained.triage_v2.sha256, "v1": trained.triage_v1.sha256}
        ),
        60,
        "canary served",
    )

    def rolled_back() -> bool:
        for _, url in kubelet.replicas.values():
            _classify(url, "triage")
        return bool(_status(api_client, namespace).get("rolledBack"))

    try:
        wait_until(rolled_back, 120, "canary rolled back", interval=0.2)
    except TimeoutError:
        conditions = _status(api_client, namespace).get("conditions")
        raise AssertionError(f"no rollback; conditions: {conditions}") from None
    status = _status(api_client, namespace)
    [record] = status["rolledBack"]
    assert (record["adapter"], record["version"], record["metric"]) == (
        "triage",
        "v1",
        "latencyP95Ms",
    )
    assert record["value"] > 1
    condition = next(c for c in status["conditions"] if c["type"] == "CanaryRolledBack")
    assert condition["status"] == "True" and "triage@v1: latencyP95Ms" in condition["message"]
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=soc").items
    assert any(e.reason == "CanaryRolledBack" and e.type == "Warning" for e in events)

    # The servers get the stable-only routing: every unpinned request goes to v2.
    def stable_only() -> bool:
        active = _status(api_client, namespace)["activeAdapters"]
        return ("triage", "v1", 0) in {(a["name"], a["version"], a["traffic"]) for a in active}

    wait_until(stable_only, 60, "v1 out of traffic on every replica")
    for _, url in kubelet.replicas.values():
        assert {_classify(url, "triage").headers["x-sectune-model"] for _ in range(10)} == {
            "triage@v2"
        }
    # The user's spec is untouched: GitOps owns it.
    spec = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "adapterdeployments", "soc"
    )["spec"]
    assert [v["traffic"] for v in spec["adapters"][0]["versions"]] == [50, 50]


@dataclass
class _VllmPod:
    """An AdapterDeployment with runtime: vllm as rendered, its paths mapped to this machine."""

    config: Any
    pod: dict[str, Any]
    etc: Path
    out: Path
    env: dict[str, str]

    def command(self, container: dict[str, Any]) -> list[str]:
        paths = {
            "/etc/sectune/serving.yaml": str(self.etc / "serving.yaml"),
            "/etc/sectune/keys/api-keys": str(self.etc / "api-keys"),
            "/adapters": str(self.out),
        }
        return [paths.get(arg, arg) for arg in container["command"]]

    def container(self, name: str) -> dict[str, Any]:
        [found] = [
            c for c in [*self.pod["containers"], *self.pod["initContainers"]] if c["name"] == name
        ]
        return found


def _vllm_pod(
    trained: Trained, tiny_model_dir: Path, tmp_path: Path, traffic: tuple[int, int] = (100, 0)
) -> _VllmPod:
    """`traffic`: the shares of triage v1 and v2 (v2 left out at 0)."""
    from sectune_operator.api import AdapterDeploymentSpec
    from sectune_operator.builders.adapterdeployment import (
        Resolved,
        build_configmap,
        build_deployment,
        render_serving_config,
    )
    from sectune_operator.settings import Settings

    triage = [("v1", trained.triage_v1, traffic[0])]
    triage += [("v2", trained.triage_v2, traffic[1])] if traffic[1] else []
    document = _manifest(trained, tiny_model_dir, triage)["spec"]
    spec = AdapterDeploymentSpec.model_validate(document | {"runtime": "vllm"})
    resolved = {("triage", v): Resolved(source.uri, source.sha256) for v, source, _ in triage}
    resolved[("other", "v1")] = Resolved(trained.other.uri, trained.other.sha256)
    config = render_serving_config(spec, resolved, set(), None).config
    assert config is not None
    pod = build_deployment("soc", spec, config, Settings())["spec"]["template"]["spec"]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "serving.yaml").write_text(build_configmap("soc", config)["data"]["serving.yaml"])
    env = trained.env | {"SECTUNE_CACHE": str(tmp_path / "cache")}
    return _VllmPod(config, pod, etc, tmp_path / "adapters", env)


def test_vllm_init_container_command_verifies_every_version_onto_disk(
    trained, tiny_model_dir, tmp_path
):
    """runtime: vllm is rendered, not run (no vLLM here): its init container's command is run
    as rendered, against the real S3 server, and refuses what the sectune server refuses."""
    from sectune.serving.config import ServingConfig
    from sectune_operator.builders.adapterdeployment import build_configmap
    from support.jobs import sectune

    vllm = _vllm_pod(trained, tiny_model_dir, tmp_path)
    config, out, env = vllm.config, vllm.out, vllm.env
    fetched = sectune(*vllm.command(vllm.container("fetch-adapters"))[1:], env=env)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    assert f"verified triage@v1 {trained.triage_v1.sha256}" in fetched.stdout
    assert (out / "triage" / "v1" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "config.json").is_file()
    served_as = vllm.container("server")["command"]
    assert "triage@v1=/adapters/triage/v1/adapter" in served_as
    # vLLM pre-allocates for --max-lora-rank: the smallest it offers that holds the adapters'.
    ranks = {
        json.loads(path.read_text())["r"] for path in out.glob("*/*/adapter/adapter_config.json")
    }
    assert ranks
    wanted = min(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks))
    assert (out / "vllm.yaml").read_text() == f"max-lora-rank: {wanted}\n"
    assert served_as[served_as.index("--config") + 1] == "/adapters/vllm.yaml"

    # A digest that does not match fails the init container: the pod never starts.
    tampered = ServingConfig.model_validate(
        config.model_dump() | {"adapters": [
            {"name": "triage", "versions": [
                {"version": "v1", "uri": trained.triage_v1.uri, "sha256": trained.triage_v2.sha256}
            ]}
        ]}
    )  # fmt: skip
    (vllm.etc / "serving.yaml").write_text(build_configmap("soc", tampered)["data"]["serving.yaml"])
    refused = sectune(*vllm.command(vllm.container("fetch-adapters"))[1:], env=env)
    assert refused.returncode == 2  # bad input, as sectune serve says it
    assert "sha256" in refused.stdout + refused.stderr


def _counts(text: str, name: str) -> dict[tuple[str, ...], float]:
    """A counter's samples in a /metrics text: (adapter, version, endpoint, code, routing) ->
    value."""
    from prometheus_client.parser import text_string_to_metric_families

    labels = ("adapter", "version", "endpoint", "code", "routing")
    return {
        tuple(sample.labels[k] for k in labels): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_vllm_pod_routes_by_traffic_measures_each_version_and_is_ready_once_all_are_listed(
    trained, tiny_model_dir, tmp_path
):
    """A contract test, not a vLLM run: the pod's init container and router sidecar run as
    rendered; vLLM is played by its documented answers for the rendered `vllm serve` command.
    Through the router, the official client gets a 50/50 canary split, pinned versions, streams,
    and the deployment's key scopes; the router's metrics count each version's requests and
    errors as a sectune server does; the operator's reading of them (serving_status) finds the
    rendered set served with the verified digests, and the pod is Ready only then."""
    import openai

    from sectune_operator.serving_status import desired, observe, parse_report
    from support.jobs import sectune
    from support.processes import Server, free_port
    from support.vllm_contract import VllmContract

    vllm = _vllm_pod(trained, tiny_model_dir, tmp_path, traffic=(50, 50))
    fetched = sectune(*vllm.command(vllm.container("fetch-adapters"))[1:], env=vllm.env)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    narrow = "narrow-key-0123456789abcdef"
    (vllm.etc / "api-keys").write_text(f"soc-console {KEY}\nother-only {narrow} other\n")
    vllm_key = "vllm-key-0123456789abcdef"
    contract = VllmContract(
        vllm.container("server")["command"], {"/adapters": str(vllm.out)}, api_key=vllm_key,
        listed=False,
    ).start()  # fmt: skip
    router_container = vllm.container("router")
    # The router gets vLLM's key from the same Secret key vLLM is started with.
    [key_env] = router_container["env"]
    assert key_env["valueFrom"]["secretKeyRef"]["key"] == "vllm-api-key"
    port, metrics_port = free_port(), free_port()
    command = vllm.command(router_container)
    for flag, value in (("--vllm-url", contract.url), ("--host", "127.0.0.1"),
                        ("--port", str(port)), ("--metrics-port", str(metrics_port))):  # fmt: skip
        command[command.index(flag) + 1] = value
    router = Server(
        "router",
        [sys.executable, "-m", "sectune.cli", *command[1:]],
        tmp_path / "router.log",
        env={key_env["name"]: "not-the-key"},
    ).start()
    base, api = f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{port}/v1"
    try:
        router.wait_http(base + "/metrics")
        # The wrong key: vLLM answers 401, the pod is not Ready and reports nothing served.
        contract.listed = True
        assert httpx.get(base + "/ready").status_code == 503
        assert "sectune_serve_vllm_up 0.0" in httpx.get(base + "/metrics").text
        router.stop()
        router.env = {key_env["name"]: vllm_key}
        router.start().wait_http(base + "/metrics")
        liveness = router_container["livenessProbe"]["httpGet"]["path"]
        assert httpx.get(base + liveness).status_code == 200  # alive, whatever vLLM says
        wait_until(lambda: httpx.get(base + "/ready").status_code == 200, 30, "router ready")
        text = httpx.get(base + "/metrics").text
        report = parse_report("soc-serve-0", text)
        assert report.served == desired(vllm.config)
        assert ("triage", "v2", trained.triage_v2.sha256, 50) in report.served
        assert observe(vllm.config, [report], ["soc-serve-0"]).converged
        # vLLM's own series pass through the same scrape.
        assert 'vllm:request_success_total{engine="0"' in text

        # The official client, with the deployment's key: `triage` is split by weight between
        # the versions' served names, `triage@v2` is pinned, a stream arrives whole.
        client = openai.OpenAI(base_url=api, api_key=KEY, max_retries=0)
        ask = [{"role": "user", "content": TEXT}]

        def answer(model: str) -> str:
            reply = client.chat.completions.create(model=model, messages=ask)
            return str(reply.choices[0].message.content)

        routed = [answer("triage") for _ in range(60)]
        split = {m: routed.count(f"answered by triage@{m}") for m in ("v1", "v2")}
        assert sum(split.values()) == 60 and min(split.values()) >= 15, split
        assert answer("triage@v2") == "answered by triage@v2"
        stream = client.chat.completions.create(model="other", messages=ask, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "answered by other@v1"
        listed = {m.id for m in client.models.list()}
        assert listed >= {"base", "triage", "triage@v1", "triage@v2", "other", "other@v1"}
        # A key scoped to `other` sees and uses only that adapter.
        scoped = openai.OpenAI(base_url=api, api_key=narrow, max_retries=0)
        assert {m.id for m in scoped.models.list()} == {"other", "other@v1"}
        with pytest.raises(openai.PermissionDeniedError, match="may not use 'triage'"):
            scoped.chat.completions.create(model="triage", messages=ask)
        with pytest.raises(openai.NotFoundError, match="available: triage, other, base"):
            client.chat.completions.create(model="triage@v9", messages=ask)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=api, api_key="x" * 20, max_retries=0).models.list()

        # Each version's requests, as the sectune server counts them: canary analysis reads
        # only what the weighted split sent it (routing="traffic").
        counts = _counts(httpx.get(base + "/metrics").text, "sectune_serve_requests_total")
        for version in ("v1", "v2"):
            assert counts[("triage", version, "chat", "200", "traffic")] == split[version]
        assert counts[("triage", "v2", "chat", "200", "pinned")] == 1
        assert counts[("other", "v1", "chat", "200", "traffic")] == 1
        assert counts[("forbidden", "", "chat", "403", "traffic")] == 1

        # A version that fails in vLLM shows as its own 500s, the other version's stay clean.
        contract.failing = {"triage@v2"}
        failed = 0
        for _ in range(40):
            try:
                assert answer("triage") == "answered by triage@v1"
            except openai.InternalServerError:
                failed += 1
        counts = _counts(httpx.get(base + "/metrics").text, "sectune_serve_requests_total")
        assert failed > 0 and counts[("triage", "v2", "chat", "500", "traffic")] == failed
        assert ("triage", "v1", "chat", "500", "traffic") not in counts

        # A streaming client that leaves: the router closes the request to vLLM at once.
        contract.failing, contract.stream_chunks, contract.chunk_seconds = set(), 400, 0.05
        with httpx.stream(
            "POST", f"{api}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "other", "messages": ask, "stream": True}, timeout=30,
        ) as response:  # fmt: skip
            assert next(response.iter_lines()).startswith("data: ")
        wait_until(lambda: contract.aborted == ["other@v1"], 10, "vLLM saw the client leave")
        wait_until(
            lambda: _counts(httpx.get(base + "/metrics").text, "sectune_serve_requests_total")
            .get(("other", "v1", "chat", "499", "traffic")) == 1,
            10, "the abandoned stream counted as 499",
        )  # fmt: skip
        # One access-log line per request, with the key's id, never a key.
        log = router.log_path.read_text()
        assert KEY not in log and narrow not in log and vllm_key not in log
        lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"time"')]
        assert {(line["key"], line["status"]) for line in lines} >= {
            ("soc-console", 200), ("other-only", 403), ("soc-console", 500), (None, 401)
        }  # fmt: skip

        # A module vLLM does not list (it failed to load one): not Ready, the rest reported.
        contract.command = [a for a in contract.command if not a.startswith("other@v1=")]
        wait_until(lambda: httpx.get(base + "/ready").status_code == 503, 30, "not ready")
        assert "other@v1" in httpx.get(base + "/ready").text
        report = parse_report("soc-serve-0", httpx.get(base + "/metrics").text)
        assert {(a, v) for a, v, _, _ in report.served} == {("triage", "v1"), ("triage", "v2")}
        assert not observe(vllm.config, [report], ["soc-serve-0"]).converged
    finally:
        router.stop()
        contract.stop()


def test_a_vllm_canary_that_fails_in_vllm_is_rolled_back_from_its_routers_figures(
    api_client,
    namespace,
    control_plane,
    start_operator,
    kubelet,
    prometheus,
    trained,
    tiny_model_dir,
    tmp_path,
):
    """runtime: vllm on the cluster, every part real but vLLM (played by its documented answers,
    support.vllm_contract): the operator renders the pods, the init container verifies every
    version from MinIO, the router sidecar runs as rendered and Prometheus scrapes it. v1 is
    Ready with its digest; `kubectl apply` of a 50/50 canary rolls the pods; v2 fails every
    request in vLLM, its router counts the 500s against v2 only, and the operator's canary
    analysis rolls it back: the next pods route every request to v1."""
    import openai

    vllm_key = "vllm-key-0123456789abcdef"
    keys = {"api-keys": f"soc-console {KEY}\n", "vllm-api-key": vllm_key}
    core = _secrets(api_client, namespace, trained, keys)
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    prometheus.start(
        [{"job_name": "sectune-serve",
          "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}]}]
    )  # fmt: skip
    start_operator(
        env={
            "SECTUNE_SERVING_METRICS_URL": kubelet.network.url_template,
            "SECTUNE_PROMETHEUS_URL": prometheus.url,
            "SECTUNE_ALLOW_FILE_URIS": "true",
        }
    )
    rollback = {"windowMinutes": 1, "minRequests": 10, "maxErrorRate": 0.05}

    def apply(triage: list[tuple[str, Any, int]]) -> None:
        document = _manifest(
            trained, tiny_model_dir, triage, runtime="vllm", replicas=1,
            promotion={"rollback": rollback},
        )  # fmt: skip
        _apply(control_plane, namespace, document, tmp_path)

    def running() -> list[str]:
        pods = core.list_namespaced_pod(
            namespace, label_selector="sectune.io/adapterdeployment=soc"
        ).items
        return [p.metadata.name for p in pods if p.status.phase == "Running"]

    def roll(**contract: Any) -> str:
        """Follow the Deployment to its one new pod: start it as rendered, stop the old one."""
        old = set(kubelet.replicas)
        wait_until(lambda: len(running()) == 1 and running()[0] not in old, 90, "pods rolled")
        [pod] = running()
        wait_until(kubelet.sync_once, 30, "rendered ConfigMap")
        deployment = client.AppsV1Api(api_client).read_namespaced_deployment("soc-serve", namespace)
        kubelet.start_vllm_pod(pod, deployment, **contract)
        for gone in old:
            kubelet.stop_pod(gone)
        server, url = kubelet.replicas[pod]
        server.wait_http(f"{url}/healthz", timeout=60)
        targets.write_text(json.dumps([{"targets": [kubelet.scraped[pod]],
                                        "labels": {"namespace": namespace, "pod": pod}}]))  # fmt: skip
        return url

    apply([("v1", trained.triage_v1, 100)])
    url = roll()
    wait_until(
        lambda: _serves(api_client, namespace, {"v1": trained.triage_v1.sha256}), 60, "v1 served"
    )
    ask = [{"role": "user", "content": TEXT}]

    def models_answering(url: str, n: int) -> list[str]:
        """Which served name answered each of n requests for `triage` (an error: its class)."""
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions
        answers = []
        for _ in range(n):
            try:
                reply = chat.create(model="triage", messages=ask)
                answers.append(str(reply.choices[0].message.content).removeprefix("answered by "))
            except openai.APIStatusError as exc:
                answers.append(type(exc).__name__)
        return answers

    assert set(models_answering(url, 5)) == {"triage@v1"}

    # The canary: a new adapter set rolls the vLLM pods; v2 fails every request in vLLM.
    apply([("v1", trained.triage_v1, 50), ("v2", trained.triage_v2, 50)])
    url = roll(failing={"triage@v2"})
    both = {"v1": trained.triage_v1.sha256, "v2": trained.triage_v2.sha256}
    wait_until(lambda: _serves(api_client, namespace, both), 60, "canary served")
    seen: list[str] = []

    def rolled_back() -> bool:
        seen.extend(models_answering(url, 5))
        return bool(_status(api_client, namespace).get("rolledBack"))

    try:
        wait_until(rolled_back, 120, "canary rolled back", interval=0.5)
    except TimeoutError:
        conditions = _status(api_client, namespace).get("conditions")
        raise AssertionError(f"no rollback; conditions: {conditions}") from None
    assert {"triage@v1", "InternalServerError"} <= set(seen)
    [record] = _status(api_client, namespace)["rolledBack"]
    assert (record["adapter"], record["version"], record["metric"]) == ("triage", "v2", "errorRate")
    # Every request the split sent v2 failed, and v1's answers did not count against it
    # (Prometheus' increase() extrapolates each series a little differently).
    assert record["value"] == pytest.approx(1.0, abs=0.01)
    # The operator renders v2 out of traffic: the next pods route every request to v1.
    url = roll()
    assert set(models_answering(url, 10)) == {"triage@v1"}
    wait_until(
        lambda: ("triage", "v2", 0)
        in {(a["name"], a["version"], a["traffic"]) for a in _status(api_client, namespace)["activeAdapters"]},
        60, "v2 out of traffic",
    )  # fmt: skip
