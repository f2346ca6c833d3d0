"""The Job the operator renders actually trains: its pod template's command and env are run as a
local process (volumes mapped to temp dirs, Secrets resolved as the kubelet would), against the
real S3 server; kwok then finishes the pod with the trainer's real termination message, and the
FineTuneJob ends Succeeded with the adapter whose digest storage holds."""

from __future__ import annotations

import json
import os

import pytest
from kubernetes import client

from sectune import artifacts, storage
from support.jobs import write_dataset
from support.kube import finish_pod, run_trainer_pod_locally
from support.processes import free_port, wait_until

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "sectune.io", "v1alpha1", "finetunejobs"


def test_operator_rendered_job_trains_for_real(
    api_client, namespace, start_operator, s3_server, s3_bucket, tiny_model_dir, tmp_path
):
    s3 = s3_server.client()
    for path in tiny_model_dir.iterdir():
        s3.upload_file(str(path), s3_bucket, f"models/tiny/{path.name}")
    train = write_dataset(tmp_path / "train.jsonl", rows=400)
    s3.upload_file(str(train), s3_bucket, "data/train.jsonl")
    client.CoreV1Api(api_client).create_namespaced_secret(
        namespace, {"metadata": {"name": "storage"}, "stringData": s3_server.env()}
    )
    metrics_port = free_port()
    start_operator(env={"SECTUNE_PROGRESS_URL": f"http://127.0.0.1:{metrics_port}/metrics"})
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "baseModel": {"uri": f"s3://{s3_bucket}/models/tiny"},
            "dataset": {"train": f"s3://{s3_bucket}/data/train.jsonl", "validationSplit": 0.25},
            "task": {"type": "classification", "labels": ["benign", "malicious"]},
            "method": {"type": "lora", "r": 4, "alpha": 8},
            "hyperparameters": {
                "learningRate": 0.01,
                "epochs": 2,
                "batchSize": 1,
                "gradientAccumulation": 1,
                "maxSeqLength": 96,
            },
            "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
            "output": {"uri": f"s3://{s3_bucket}/adapters", "credentials": {"name": "storage"}},
        },
    }
    objects = client.CustomObjectsApi(api_client)
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    wait_until(
        lambda: client.BatchV1Api(api_client).list_namespaced_job(namespace).items,
        30,
        "training Job",
    )

    process, termination = run_trainer_pod_locally(
        api_client, namespace, "tiny-train", tmp_path / "pod", metrics_port
    )
    try:
        # While it trains, the operator reads progress from the trainer's metrics endpoint.
        def progress() -> dict:
            status = (
                objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tiny").get(
                    "status"
                )
                or {}
            )
            return status.get("progress") or {}

        def trained_a_step_or_exited() -> bool:
            return process.poll() is not None or bool(progress().get("step", 0) > 0)

        wait_until(trained_a_step_or_exited, 180, "status.progress from the trainer")
        assert process.poll() is None, f"the trainer exited early:\n{process.stdout.read()[-3000:]}"  # type: ignore[union-attr]
        assert progress()["totalSteps"] == 600
        assert _phase(objects, namespace) == "Training"
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]

    finish_pod(api_client, namespace, "tiny", process.returncode, termination.read_text())
    wait_until(lambda: _phase(objects, namespace) == "Succeeded", 60, "Succeeded")

    status = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tiny")[
        "status"
    ]
    os.environ.update(s3_server.env())
    pointer = artifacts.current(f"s3://{s3_bucket}/adapters/tiny")
    assert pointer is not None
    assert status["adapter"]["sha256"] == pointer["sha256"]
    assert (
        status["adapter"]["uri"] == f"s3://{s3_bucket}/adapters/tiny/versions/{pointer['version']}"
    )
    manifest = artifacts.verify(status["adapter"]["uri"], status["adapter"]["sha256"]).as_dict()
    assert manifest["files"]["adapter/adapter_model.safetensors"]["size"] > 0
    stored_bytes = sum(f["size"] for n, f in manifest["files"].items() if n.startswith("adapter/"))
    assert status["adapter"]["sizeBytes"] == stored_bytes
    assert status["dataset"]["redactions"]["USERNAME"] > 0
    report = json.loads(storage.read_bytes(f"{status['adapter']['uri']}/report.json"))
    # what kubectl shows is what the stored report measured
    assert status["metrics"]["accuracy"] == pytest.approx(report["models"]["tuned"]["accuracy"])
    stored = json.loads(storage.read_bytes(f"{status['adapter']['uri']}/manifest.json"))
    assert stored["baseModel"]["uri"] == f"s3://{s3_bucket}/models/tiny"


def _phase(objects, namespace: str) -> str | None:  # type: ignore[no-untyped-def]
    return (
        objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "tiny").get(
            "status"
        )
        or {}
    ).get("phase")
