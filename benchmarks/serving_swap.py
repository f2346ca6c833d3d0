"""Hot swap latency: `kubectl apply` of a new adapter version -> every replica serving it.

Runs the real control plane, the operator (shipped settings), the real S3 server and two
`sectune serve` replicas started with the command the operator rendered (the pods kwok plays;
a stand-in kubelet copies the ConfigMap into their config file). Then swaps the `triage`
adapter between two trained versions N times and times each part:

- render: apply returned -> the ConfigMap holds the new set (operator),
- kubelet: ConfigMap changed -> file on the replicas' disk (here a poll every --kubelet-poll
  seconds; a real kubelet takes up to its sync period plus its ConfigMap cache TTL, ~60-90 s
  with defaults),
- reload: file changed -> every replica reports the new version on /metrics (server),
- status: every replica serving -> status.activeAdapters says so (operator's status interval).

    python benchmarks/serving_swap.py --swaps 10

Results go in BENCHMARKS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kubernetes import client, config  # noqa: E402

from sectune.yamlio import dump_yaml  # noqa: E402
from support.controlplane import ControlPlane, add_gpu_nodes  # noqa: E402
from support.kubelet import Kubelet  # noqa: E402
from support.operator import OperatorProcess, install_chart_rbac  # noqa: E402
from support.processes import wait_until  # noqa: E402
from support.replicas import ReplicaNetwork  # noqa: E402
from support.s3 import S3Server  # noqa: E402
from support.tiny_model import build_tiny_model  # noqa: E402
from support.trained import Trained, Version, train_adapters  # noqa: E402

NAMESPACE = "swap"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def manifest(trained: Trained, model: Path, triage: Version) -> dict[str, Any]:
    def pinned(version: str, source: Version) -> dict[str, Any]:
        return {"version": version, "source": {"uri": source.uri, "sha256": source.sha256}}

    return {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "soc"},
        "spec": {
            "baseModel": {"uri": f"file://{model}"},
            "adapters": [
                {"name": "triage", "versions": [pinned("live", triage)]},
                {"name": "other", "versions": [pinned("v1", trained.other)]},
            ],
            "replicas": 2,
            "credentials": {"name": "storage"},
        },
    }


def served_sha(url: str) -> str | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith('sectune_serve_adapter_info{adapter="triage"'):
            return line.split('sha256="')[1].split('"')[0]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--kubelet-poll", type=float, default=0.1)
    parser.add_argument(
        "--model",
        help="base model folder (default: a tiny random model); the demo model is "
        "~/.cache/sectune/models/SmolLM2-135M-Instruct",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA r of the swapped adapters")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sectune-swap-"))
    plane = ControlPlane(workdir / "plane").start()
    s3 = S3Server(workdir / "s3").start()
    network = ReplicaNetwork()
    kubelet: Kubelet | None = None
    operator: OperatorProcess | None = None
    try:
        api = config.new_client_from_config(str(plane.kubeconfig))
        core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
        add_gpu_nodes(core, ("kwok-node-0",))
        assert plane.kubectl("apply", "--server-side", "-f", str(ROOT / "crds")).returncode == 0
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all")
        kubeconfig = install_chart_rbac(plane, api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        wait_until(lambda: bool(core.list_namespaced_service_account(NAMESPACE).items), 30, "SA")
        model = Path(args.model).expanduser() if args.model else build_tiny_model(workdir / "model")
        trained = train_adapters(
            s3, model, workdir / "train", method={"r": args.rank, "alpha": 2 * args.rank}
        )
        key = trained.triage_v1.uri.split("/", 3)[3] + "/adapter/adapter_model.safetensors"
        size = s3.client().head_object(Bucket=trained.bucket, Key=key)["ContentLength"]
        print(f"base model {model}; adapter r={args.rank}: {size / 1e6:.1f} MB", flush=True)
        core.create_namespaced_secret(
            NAMESPACE, {"metadata": {"name": "storage"}, "stringData": trained.env}
        )
        operator = OperatorProcess(
            kubeconfig,
            workdir,
            env={
                "SECTUNE_WATCH": NAMESPACE,
                "SECTUNE_STATUS_INTERVAL": "5",  # the shipped default
                "SECTUNE_SERVING_METRICS_URL": network.url_template,
                "SECTUNE_ALLOW_FILE_URIS": "true",
            },
        ).start()
        kubelet = Kubelet(api, NAMESPACE, workdir / "kubelet", network, poll=args.kubelet_poll)
        path = workdir / "adep.yaml"

        def apply(version: Version) -> float:
            path.write_text(dump_yaml(manifest(trained, model, version)))
            began = time.monotonic()
            result = plane.kubectl("apply", "-n", NAMESPACE, "-f", str(path))
            assert result.returncode == 0, result.stderr
            return began

        apply(trained.triage_v1)
        wait_until(kubelet.sync_once, 60, "ConfigMap")
        deployment = client.AppsV1Api(api).read_namespaced_deployment("soc-serve", NAMESPACE)

        def running() -> list[str]:
            pods = core.list_namespaced_pod(NAMESPACE).items
            return sorted(p.metadata.name for p in pods if p.status.phase == "Running")

        wait_until(lambda: len(running()) == 2, 60, "pods")
        for pod in running():
            kubelet.start_pod(pod, deployment)
        for server, url in kubelet.replicas.values():
            server.wait_http(f"{url}/readyz", timeout=300)
        threading.Thread(target=kubelet.sync_forever, daemon=True).start()
        urls = [url for _, url in kubelet.replicas.values()]

        parts: dict[str, list[float]] = {
            k: [] for k in ("render", "kubelet", "reload", "status", "product", "total")
        }
        for swap in range(args.swaps):
            target = trained.triage_v2 if swap % 2 == 0 else trained.triage_v1
            syncs = kubelet.syncs
            began = apply(target)
            seen: dict[str, float] = {}
            while "status" not in seen:
                now = time.monotonic()
                if "render" not in seen:
                    configmap = core.read_namespaced_config_map("soc-serve", NAMESPACE)
                    if target.sha256 in configmap.data["serving.yaml"]:
                        seen["render"] = now
                if "render" in seen and "kubelet" not in seen and kubelet.syncs > syncs:
                    seen["kubelet"] = now
                if (
                    "kubelet" in seen
                    and "reload" not in seen
                    and all(served_sha(url) == target.sha256 for url in urls)
                ):
                    seen["reload"] = now
                if "reload" in seen:
                    status = objects.get_namespaced_custom_object(
                        "sectune.io", "v1alpha1", NAMESPACE, "adapterdeployments", "soc"
                    ).get("status", {})
                    active = {a["name"]: a["sha256"] for a in status.get("activeAdapters", [])}
                    if active.get("triage") == target.sha256:
                        seen["status"] = now
                if now - began > 300:
                    raise TimeoutError(f"swap {swap} stuck after {sorted(seen)}")
                time.sleep(0.02)
            parts["render"].append(seen["render"] - began)
            parts["kubelet"].append(seen["kubelet"] - seen["render"])
            parts["reload"].append(seen["reload"] - seen["kubelet"])
            parts["status"].append(seen["status"] - seen["reload"])
            parts["product"].append(parts["render"][-1] + parts["reload"][-1])
            parts["total"].append(seen["reload"] - began)
            time.sleep(1)
        print(
            json.dumps(
                {
                    "swaps": args.swaps,
                    "kubeletPollSeconds": args.kubelet_poll,
                    **{
                        name: {
                            "p50Seconds": round(percentile(values, 0.5), 3),
                            "p99Seconds": round(percentile(values, 0.99), 3),
                            "maxSeconds": round(max(values), 3),
                        }
                        for name, values in parts.items()
                    },
                },
                indent=2,
            )
        )
    finally:
        if kubelet is not None:
            kubelet.stop()
        if operator is not None:
            operator.stop()
        network.stop()
        s3.stop()
        plane.stop()


if __name__ == "__main__":
    main()
