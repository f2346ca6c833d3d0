"""A real Kubernetes control plane on loopback: etcd, kube-apiserver (TLS, RBAC,
service-account tokens, admission), kube-controller-manager, kube-scheduler and kwok.

One per pytest session; see tests/conftest.py for the fixtures built on it.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .pki import TestPKI
from .processes import Server, free_port, tool, wait_until

STAGES = Path(__file__).with_name("kwok-stages.yaml")
KWOK_NODE_LABEL = "sectune.dev/kwok-node"

# Controllers the tests rely on: Jobs and their pods, owner-reference garbage
# collection, namespaces and service accounts (with their tokens and CA bundle).
CONTROLLERS = ",".join(
    [
        "job-controller",
        "garbage-collector-controller",
        "namespace-controller",
        "serviceaccount-controller",
        "serviceaccount-token-controller",
        "root-ca-certificate-publisher-controller",
        "replicaset-controller",
        "deployment-controller",
        "endpointslice-controller",
        "resourcequota-controller",
        "ttl-after-finished-controller",
        "clusterrole-aggregation-controller",
    ]
)


def kubeconfig_yaml(server: str, ca: Path, user: dict[str, str], name: str = "sectune-test") -> str:
    """A one-context kubeconfig; `user` holds client-certificate/key paths or a token."""
    return yaml.dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        }
    )


@dataclass
class ControlPlane:
    """Starts and stops the control plane; every process logs under `workdir`."""

    workdir: Path
    servers: list[Server] = field(default_factory=list)
    server_url: str = ""
    audit_users: tuple[str, ...] = ()
    """Users whose requests kube-apiserver writes to `audit_log` (one JSON line per request);
    empty: no audit log. Benchmarks count the operator's own requests this way."""

    def __post_init__(self) -> None:
        self.pki = TestPKI(self.workdir / "pki")
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.audit_log = self.workdir / "logs" / "audit.jsonl"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> ControlPlane:
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def logs(self, lines: int = 30) -> str:
        return "\n".join(
            f"----- {s.name} ({s.log_path}) -----\n{s.tail(lines)}" for s in self.servers
        )

    def ensure_alive(self) -> None:
        for server in self.servers:
            server.ensure_alive()

    # -- components ----------------------------------------------------------------

    def _run(self, name: str, args: list[str]) -> Server:
        server = Server(name, args, self.workdir / "logs" / f"{name}.log").start()
        self.servers.append(server)
        return server

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = self._run(
            "etcd",
            [
                tool("etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--listen-metrics-urls=",
                "--quota-backend-bytes=4294967296",
                "--unsafe-no-fsync",
            ],
        )

        def healthy() -> bool:
            etcd.ensure_alive()
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as resp:
                return b'"true"' in resp.read()

        wait_until(healthy, 60, "etcd")

    def _audit_flags(self) -> list[str]:
        if not self.audit_users:
            return []
        policy = self.workdir / "audit-policy.yaml"
        rules = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata", "users": list(self.audit_users)}, {"level": "None"}],
        }
        policy.write_text(json.dumps(rules))
        self.audit_log.parent.mkdir(parents=True, exist_ok=True)
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}"]

    def audited_requests(self) -> list[dict[str, Any]]:
        """The audit log's entries so far (requests of `audit_users`)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    def _start_apiserver(self) -> None:
        pki = self.pki
        port = free_port()
        self.server_url = f"https://127.0.0.1:{port}"
        serving = pki.issue(
            "apiserver",
            "kube-apiserver",
            server_hosts=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc"),
        )
        self.sa_key, sa_pub = pki.signing_key("service-accounts")
        admin = pki.issue("admin", "sectune-admin", organizations=("system:masters",))
        self.kubeconfig.write_text(
            kubeconfig_yaml(
                self.server_url,
                pki.ca_cert,
                {"client-certificate": str(admin[0]), "client-key": str(admin[1])},
            )
        )
        apiserver = self._run(
            "kube-apiserver",
            [
                tool("kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={serving[0]}",
                f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={self.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--enable-priority-and-fairness=false",
                # The kubernetes Service would point at a loopback address, which is refused.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
                *self._audit_flags(),
            ],
        )
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(admin[0]), str(admin[1]))

        def ready() -> bool:
            apiserver.ensure_alive()
            with urllib.request.urlopen(f"{self.server_url}/readyz", context=context, timeout=5):
                return True

        wait_until(ready, 120, "kube-apiserver", interval=0.5)

    def _component_kubeconfig(self, name: str, user: str, groups: tuple[str, ...] = ()) -> Path:
        cert, key = self.pki.issue(name, user, organizations=groups)
        path = self.workdir / f"{name}.kubeconfig"
        path.write_text(
            kubeconfig_yaml(
                self.server_url,
                self.pki.ca_cert,
                {"client-certificate": str(cert), "client-key": str(key)},
            )
        )
        return path

    def _start_controllers(self) -> None:
        kcm = self._component_kubeconfig("controller-manager", "system:kube-controller-manager")
        self._run(
            "kube-controller-manager",
            [
                tool("kube-controller-manager"),
                f"--kubeconfig={kcm}",
                f"--authentication-kubeconfig={kcm}",
                f"--authorization-kubeconfig={kcm}",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--concurrent-job-syncs=10",
                "--v=1",
            ],
        )
        scheduler = self._component_kubeconfig("scheduler", "system:kube-scheduler")
        self._run(
            "kube-scheduler",
            [
                tool("kube-scheduler"),
                f"--kubeconfig={scheduler}",
                f"--authentication-kubeconfig={scheduler}",
                f"--authorization-kubeconfig={scheduler}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )
        self._run(
            "kwok",
            [
                tool("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-label-selector={KWOK_NODE_LABEL}",
                f"--config={STAGES}",
                f"--server-address=127.0.0.1:{free_port()}",
                "--node-ip=10.244.0.1",
                "--cidr=10.244.0.0/16",
            ],
        )

    # -- helpers for tests -----------------------------------------------------------

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this control plane (admin unless told otherwise)."""
        return subprocess.run(
            [tool("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def token_kubeconfig(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with a bearer token (a ServiceAccount's)."""
        path.write_text(kubeconfig_yaml(self.server_url, self.pki.ca_cert, {"token": token}))
        return path


def add_gpu_nodes(
    core: Any, names: tuple[str, ...], gpus: int = 8, cpu: str = "32", memory: str = "256Gi"
) -> None:
    """Create fake GPU nodes and make them schedulable. The API server taints every new node
    not-ready; in a real cluster the node-lifecycle controller lifts the taint once the kubelet
    reports Ready. That controller is not run here (kwok's nodes have no kubelet heartbeats to
    judge), so the taint is lifted directly."""
    for name in names:
        core.create_node(gpu_node(name, gpus, cpu, memory))
        core.patch_node(name, {"spec": {"taints": None}})


def gpu_node(name: str, gpus: int = 8, cpu: str = "32", memory: str = "256Gi") -> dict[str, object]:
    """A fake node kwok manages, with `nvidia.com/gpu` capacity so GPU pods schedule."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                KWOK_NODE_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake"},
        },
        "spec": {},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
