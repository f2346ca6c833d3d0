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
from support.processes import Server, free_port, tool, wait_until

pytestmark = pytest.mark.cluster


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
    """One pod of the rendered Deployment as a process: its args and env, its own ports."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    health = free_port()
    env |= {
        "KUBECONFIG": str(kubeconfig),  # in a pod: the ServiceAccount's token
        "SECTUNE_METRICS_PORT": str(free_port()),
        "PYTHONUNBUFFERED": "1",
    }
    args = [*(container.get("args") or []), "--liveness", f"http://127.0.0.1:{health}/healthz"]
    server = Server(
        name, [sys.executable, "-m", "sectune_operator", *args], workdir / f"{name}.log", env=env
    ).start()
    server.wait_http(f"http://127.0.0.1:{health}/healthz")
    return server


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
    peering = [d for d in documents if d["kind"] == "ClusterKopfPeering"]
    assert [p["metadata"]["name"] for p in peering] == ["sectune"]
    manifest = tmp_path / "peering.yaml"
    manifest.write_text("\n---\n".join(json.dumps(p) for p in peering))
    assert control_plane.kubectl("apply", "-f", str(manifest)).returncode == 0

    servers = [
        _replica(deployment, f"replica-{i}", operator_kubeconfig, tmp_path) for i in range(replicas)
    ]
    try:
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
        wait_until(lambda: _acted(standby, "second"), 2 * lifetime + 30, "standby took over")
        print(f"failover after SIGKILL: {time.monotonic() - killed:.1f} s (lifetime {lifetime} s)")
    finally:
        for server in servers:
            server.stop()
        control_plane.kubectl("delete", "-f", str(manifest), "--ignore-not-found")

    # replicaCount 1, installed afresh: the peering object is rendered too (the operator waits
    # for it), and the one replica acts alone.
    single = render("replicaCount=1")
    assert [d["kind"] for d in single if "Peering" in d["kind"]] == ["ClusterKopfPeering"]
    assert control_plane.kubectl("apply", "-f", str(manifest)).returncode == 0
    alone = _replica(_deployment(single), "alone", operator_kubeconfig, tmp_path)
    try:
        _ftj(api_client, namespace, "third")
        wait_until(lambda: _acted(alone, "third"), 60, "single replica acted")
    finally:
        alone.stop()
        control_plane.kubectl("delete", "-f", str(manifest), "--ignore-not-found")
