"""FineTuneJobs on the test cluster and their ends: kwok finishes a training pod with the exit
code and the trainer's result (termination message) the test chooses, or that the trainer
container, run as a local process, wrote."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubernetes import client

from .processes import wait_until

JOB_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/smollm2"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "task": {"type": "classification", "labels": ["benign", "malicious"]},
    "resources": {"memory": "1Gi"},
    "output": {"uri": "s3://adapters/soc", "credentials": {"name": "storage"}},
}
"""A small classification job whose storage Secret is named `storage`."""


def create_job(api_client: Any, namespace: str, name: str) -> None:
    body = {"apiVersion": "sectune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}}
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "sectune.io", "v1alpha1", namespace, "finetunejobs", {**body, "spec": JOB_SPEC}
    )


def finish_job(
    api_client: Any, namespace: str, name: str, sha256: str, gates_passed: bool = True
) -> None:
    gate = {"name": "recall[malicious]>=0.95", "passed": gates_passed, "value": 0.97}
    if not gates_passed:
        gate["value"] = 0.81
    result = {
        "phase": "Succeeded" if gates_passed else "Failed",
        "reason": "GatesPassed" if gates_passed else "GatesFailed",
        "message": "gates",
        "adapter": {"uri": f"s3://adapters/soc/{name}/versions/run-9", "sha256": sha256},
        "gates": [gate],
    }
    finish_pod(api_client, namespace, name, 0 if gates_passed else 3, json.dumps(result))
    phase = "Succeeded" if gates_passed else "Failed"
    wait_until(
        lambda: (
            (
                client.CustomObjectsApi(api_client)
                .get_namespaced_custom_object(
                    "sectune.io", "v1alpha1", namespace, "finetunejobs", name
                )
                .get("status")
                or {}
            ).get("phase")
            == phase
        ),
        60,
        f"{name} {phase}",
    )


def run_trainer_pod_locally(
    api_client, namespace: str, job_name: str, workdir: Path, metrics_port: int
) -> tuple[subprocess.Popen[str], Path]:  # type: ignore[no-untyped-def]
    """Start the trainer container of the Job's pod template as a local process: volumes
    mapped to directories under `workdir`, Secrets resolved as the kubelet would, the metrics
    port on loopback. Returns the process and the path of its termination message."""
    core = client.CoreV1Api(api_client)
    job = client.BatchV1Api(api_client).read_namespaced_job(job_name, namespace)
    pod = job.spec.template.spec
    [container] = pod.containers
    mounts: dict[str, Path] = {}
    for mount in container.volume_mounts:
        local = workdir / mount.name
        local.mkdir(parents=True, exist_ok=True)
        volume = next(v for v in pod.volumes if v.name == mount.name)
        if volume.downward_api:  # what the kubelet projects from the pod's annotations
            annotations = job.spec.template.metadata.annotations or {}
            for item in volume.downward_api.items:
                key = item.field_ref.field_path.removeprefix("metadata.annotations['")[:-2]
                (local / item.path).write_text(annotations[key])
        mounts[mount.mount_path] = local

    def local_path(value: str) -> str:
        for mount_path, local in sorted(mounts.items(), key=lambda m: -len(m[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path) :]
        return value

    env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1"}
    for variable in container.env:
        if variable.value_from:
            ref = variable.value_from.secret_key_ref
            data = core.read_namespaced_secret(ref.name, namespace).data or {}
            if ref.key in data:
                env[variable.name] = base64.b64decode(data[ref.key]).decode()
        else:
            env[variable.name] = local_path(variable.value)
    env["SECTUNE_METRICS_PORT"] = str(metrics_port)  # the pod's port, on loopback here
    termination = workdir / "termination-log"
    env["SECTUNE_TERMINATION_LOG"] = str(termination)
    command = [local_path(part) for part in container.command]
    assert command[0] == "sectune"
    process = subprocess.Popen(
        [sys.executable, "-m", "sectune.cli", *command[1:]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    return process, termination


def finish_pod(api_client: Any, namespace: str, job: str, exit_code: int, message: str) -> None:
    """kwok ends the FineTuneJob's training pod, once it runs, with this exit code and
    termination message."""
    core = client.CoreV1Api(api_client)

    def running_pod() -> Any:
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"sectune.io/finetunejob={job}"
        ).items
        return next((p for p in pods if p.status.phase == "Running"), None)

    wait_until(lambda: running_pod() is not None, 60, f"{job} training pod running")
    annotations = {
        "sectune.dev/test-exit-code": str(exit_code),
        "sectune.dev/test-termination-message": message,
    }
    core.patch_namespaced_pod(
        running_pod().metadata.name, namespace, {"metadata": {"annotations": annotations}}
    )
