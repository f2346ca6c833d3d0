"""What a kubelet does for AdapterDeployment server pods, played on this machine: sync the
rendered ConfigMap and the keys Secret into files, and run each pod's container command (as the
operator rendered it) as a local process standing in for that pod."""

from __future__ import annotations

import base64
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .processes import Server, free_port
from .replicas import ReplicaNetwork


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

    def start_pod(self, pod: str, deployment: Any) -> None:
        core = client.CoreV1Api(self.api)
        container = deployment.spec.template.spec.containers[0]
        env: dict[str, str] = {}
        for item in container.env:
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
        env |= {
            "HOME": str(root),
            "SECTUNE_CACHE": str(root / "cache"),
            "HF_HOME": str(root / "hf"),
        }
        keys_path = self.workdir / "etc" / "api-keys"
        for volume in deployment.spec.template.spec.volumes:
            if volume.secret is not None:
                data = core.read_namespaced_secret(volume.secret.secret_name, self.namespace).data
                keys_path.write_bytes(base64.b64decode(data["api-keys"]))
        port = free_port()
        paths = {
            "/etc/sectune/serving.yaml": str(self.config_path),
            "/etc/sectune/keys/api-keys": str(keys_path),
        }
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
        self.network.route(pod, f"{url}/metrics")

    def stop(self) -> None:
        self._stop.set()
        for server, _ in self.replicas.values():
            server.stop()
