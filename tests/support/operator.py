"""The sectune operator as a real process, authenticated as a ServiceAccount bound to the
ClusterRole the Helm chart ships (and nothing else)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from .controlplane import ControlPlane
from .processes import Server, free_port, tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "sectune"
OPERATOR_NAMESPACE = "sectune-system"
OPERATOR_ACCOUNT = "sectune-operator"


def install_chart_rbac(plane: ControlPlane, api_client: Any) -> Path:
    """Render the chart's ClusterRole, binding, ServiceAccount and kopf peering CRDs with helm,
    apply them, and return a kubeconfig holding the ServiceAccount's token."""
    rendered = subprocess.run(
        [
            tool("helm"), "template", "sectune", str(CHART),
            "--namespace", OPERATOR_NAMESPACE, "--kube-version", "1.37.2",
            "--set", f"serviceAccount.name={OPERATOR_ACCOUNT}",
            "--show-only", "templates/clusterrole.yaml",
            "--show-only", "templates/clusterrolebinding.yaml",
            "--show-only", "templates/serviceaccount.yaml",
            "--show-only", "templates/crds/kopf-peering.yaml",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    core = client.CoreV1Api(api_client)
    if not [n for n in core.list_namespace().items if n.metadata.name == OPERATOR_NAMESPACE]:
        core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    manifest = plane.workdir / "operator-rbac.yaml"
    manifest.write_text(rendered)
    applied = plane.kubectl("apply", "--server-side", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    token = core.create_namespaced_service_account_token(
        OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, {"spec": {"expirationSeconds": 86400}}
    ).status.token
    return plane.token_kubeconfig(token, plane.workdir / "operator.kubeconfig")


@dataclass
class OperatorProcess:
    """`python -m sectune_operator` with the operator's own identity."""

    kubeconfig: Path
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    peering: str = ""
    priority: int = 0
    name: str = "operator"
    server: Server | None = None
    metrics_url: str = ""

    def start(self) -> OperatorProcess:
        health, metrics = free_port(), free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        self.server = Server(
            self.name,
            [
                sys.executable,
                "-m",
                "sectune_operator",
                "--liveness",
                f"http://127.0.0.1:{health}/healthz",
                "--peering",
                self.peering,
                "--priority",
                str(self.priority),
            ],
            self.workdir / f"{self.name}.log",
            env={
                "KUBECONFIG": str(self.kubeconfig),
                "SECTUNE_METRICS_PORT": str(metrics),
                "SECTUNE_TRAINER_IMAGE": "sectune-trainer:test",
                "SECTUNE_STATUS_INTERVAL": "1",  # quicker convergence for the tests
                # a tiny job trains for seconds: ask a trainer still loading again soon
                "SECTUNE_PROGRESS_BACKOFF": "1",
                "PYTHONUNBUFFERED": "1",
                **self.env,
            },
        ).start()
        self.server.wait_http(f"http://127.0.0.1:{health}/healthz")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.server and self.server.process and self.server.process.poll() is None:
            if kill:
                self.server.process.kill()
                self.server.process.wait()
            else:
                self.server.stop()

    def log(self) -> str:
        return self.server.log_path.read_text(errors="replace") if self.server else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            return str(response.read().decode())
