"""What a kubelet does for AdapterDeployment server pods, played on this machine: sync the
rendered ConfigMap and the keys Secret into files, and run each pod's container command (as the
operator rendered it) as a local process standing in for that pod; in a vLLM pod, the init
container and the router sidecar run as rendered and vLLM is played by its documented answers
(support.vllm_contract)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .processes import Server, free_port
from .replicas import ReplicaNetwork
from .vllm_contract import VllmContract


@dataclass
class Kubelet:
    """What a kubelet does for the server pods, on this machine: syncs the ConfigMap and the
    keys Secret into files, and runs each pod's container command as a local process."""

    api: Any
    namespace: str
    workdir: Path
    network: ReplicaNetwork
    name: str = "soc"
    """The AdapterDeployment."""
    poll: float = 0.5
    """Seconds between ConfigMap checks (a real kubelet: up to its sync period plus cache TTL)."""
    replicas: dict[str, tuple[Server, str]] = field(default_factory=dict)
    contracts: dict[str, VllmContract] = field(default_factory=dict)
    """vLLM pods: what plays each one's vLLM."""
    scraped: dict[str, str] = field(default_factory=dict)
    """Each pod's metrics address (host:port), as Prometheus would find it."""
    syncs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def config_path(self) -> Path:
        return self.workdir / "etc" / "serving.yaml"

    def sync_once(self) -> bool:
        try:
            configmap = client.CoreV1Api(self.api).read_namespaced_config_map(
                f"{self.name}-serve", self.namespace
            )
        except ApiException:
            return False
        text = configmap.data["serving.yaml"]
        if self.config_path.exists() and self.config_path.read_text() == text:
            return True
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)  # atomically, as the kubelet swaps a ConfigMap volume
        self.syncs += 1
        return True

    def sync_forever(self) -> None:
        while not self._stop.wait(self.poll):
            self.sync_once()

    def _env(self, container: Any, pod: str) -> dict[str, str]:
        """The container's environment as a kubelet fills it: values, Secret keys, the pod's
        address (this machine's)."""
        core = client.CoreV1Api(self.api)
        env: dict[str, str] = {}
        for item in container.env or []:
            if item.value_from is None:
                env[item.name] = item.value
                continue
            if item.value_from.field_ref is not None:  # the pod's own address: this machine's
                assert item.value_from.field_ref.field_path == "status.podIP"
                env[item.name] = "127.0.0.1"
                continue
            ref = item.value_from.secret_key_ref
            data = core.read_namespaced_secret(ref.name, self.namespace).data or {}
            if ref.key in data:
                env[item.name] = base64.b64decode(data[ref.key]).decode()
        root = self.workdir / pod
        return env | {
            "HOME": str(root),
            "SECTUNE_CACHE": str(root / "cache"),
            "HF_HOME": str(root / "hf"),
        }

    def _paths(self, deployment: Any, pod: str) -> dict[str, str]:
        """The pod's mounted files, on this machine: the ConfigMap, the keys Secret, the
        adapters volume."""
        core = client.CoreV1Api(self.api)
        keys_path = self.workdir / "etc" / "api-keys"
        for volume in deployment.spec.template.spec.volumes:
            if volume.secret is not None:
                data = core.read_namespaced_secret(volume.secret.secret_name, self.namespace).data
                keys_path.write_bytes(base64.b64decode(data["api-keys"]))
        return {
            "/etc/sectune/serving.yaml": str(self.config_path),
            "/etc/sectune/keys/api-keys": str(keys_path),
            "/adapters": str(self.workdir / pod / "adapters"),
        }

    def start_pod(self, pod: str, deployment: Any) -> None:
        """A sectune server pod: its container's command as a local process."""
        container = deployment.spec.template.spec.containers[0]
        env = self._env(container, pod)
        paths = self._paths(deployment, pod)
        port = free_port()
        command = [paths.get(arg, arg) for arg in container.command]
        assert command[:2] == ["sectune", "serve"]
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        server = Server(
            pod,
            [sys.executable, "-m", "sectune.cli", *command[1:]],
            self.workdir / f"{pod}.log",
            env=env,
        ).start()
        url = f"http://127.0.0.1:{port}"
        self.replicas[pod] = (server, url)
        self.scraped[pod] = url.removeprefix("http://")
        self.network.route(pod, f"{url}/metrics")

    def start_vllm_pod(self, pod: str, deployment: Any, **contract: Any) -> VllmContract:
        """A vLLM pod: its init container's command run to the end (verifying every version
        into the adapters volume), vLLM played by its documented answers for the rendered
        `vllm serve` command (`contract`: VllmContract's settings), and the router sidecar's
        command as a local process. `replicas[pod]` is the router's API address."""
        spec = deployment.spec.template.spec
        [init] = spec.init_containers
        [vllm] = [c for c in spec.containers if c.name == "server"]
        [router] = [c for c in spec.containers if c.name == "router"]
        paths = self._paths(deployment, pod)
        fetch = [paths.get(arg, arg) for arg in init.command]
        fetched = subprocess.run(
            [sys.executable, "-m", "sectune.cli", *fetch[1:]],
            env=os.environ | self._env(init, pod),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert fetched.returncode == 0, f"{pod} init container failed: {fetched.stderr[-2000:]}"
        router_env = self._env(router, pod)
        served = VllmContract(
            vllm.command,
            {"/adapters": paths["/adapters"]},
            api_key=router_env.get("SECTUNE_VLLM_API_KEY"),
            **contract,
        ).start()
        port, metrics_port = free_port(), free_port()
        command = [paths.get(arg, arg) for arg in router.command]
        assert command[:2] == ["sectune", "route-vllm"]
        for flag, value in (
            ("--vllm-url", served.url),
            ("--host", "127.0.0.1"),
            ("--port", str(port)),
            ("--metrics-port", str(metrics_port)),
        ):
            command[command.index(flag) + 1] = value
        process = Server(
            pod,
            [sys.executable, "-m", "sectune.cli", *command[1:]],
            self.workdir / f"{pod}.log",
            env=router_env,
        ).start()
        self.replicas[pod] = (process, f"http://127.0.0.1:{port}")
        self.contracts[pod] = served
        self.scraped[pod] = f"127.0.0.1:{metrics_port}"
        self.network.route(pod, f"http://127.0.0.1:{metrics_port}/metrics")
        return served

    def stop_pod(self, pod: str) -> None:
        """The pod is gone: its processes stop."""
        server, _ = self.replicas.pop(pod)
        self.scraped.pop(pod, None)
        server.stop()
        if pod in self.contracts:
            self.contracts.pop(pod).stop()

    def stop(self) -> None:
        self._stop.set()
        for pod in list(self.replicas):
            self.stop_pod(pod)
