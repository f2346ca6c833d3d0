"""FineTuneJobs on the test cluster and their ends: kwok finishes a training pod with the exit
code and the trainer's result (termination message) the test chooses."""

from __future__ import annotations

import json
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
    core = client.CoreV1Api(api_client)

    def running_pod() -> Any:
        pods = core.list_namespaced_pod(
            namespace, label_selector=f"sectune.io/finetunejob={name}"
        ).items
        return next((p for p in pods if p.status.phase == "Running"), None)

    wait_until(lambda: running_pod() is not None, 60, f"{name} training pod running")
    annotations = {
        "sectune.dev/test-exit-code": "0" if gates_passed else "3",
        "sectune.dev/test-termination-message": json.dumps(result),
    }
    core.patch_namespaced_pod(
        running_pod().metadata.name, namespace, {"metadata": {"annotations": annotations}}
    )
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
