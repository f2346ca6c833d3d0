"""FineTuneJob -> batch/v1 Job (+ NetworkPolicy, + multi-node headless Service). Pure functions.

The Job runs `sectune train --config /etc/sectune/job.json` in a restricted pod; the file is
the trainer's contract, carried in the pod template's annotation CONFIG_ANNOTATION and
projected by the downward API (no ConfigMap: one object fewer to create, watch and
garbage-collect per job, which at 1,000 jobs created at once was a quarter of the time). Its Pod
failure policy fails fast on the trainer's "bad input" and "gates failed" exit codes, ignores
disruptions (preemption, eviction, node loss: retried, resumed from the checkpoint) and counts
anything else against backoffLimit.
"""

from __future__ import annotations

import json
from typing import Any

from sectune.config import CLUSTER_ONLY_FIELDS, JobSpec
from sectune.contract import (
    METRICS_PORT,
    TERMINATION_LOG,
    TRAIN_ARGS,
    TRAIN_MODULE,
    ExitCode,
)
from sectune_operator.api import FineTuneJobSpec
from sectune_operator.builders import pods
from sectune_operator.settings import Settings

JOB_LABEL = "sectune.io/finetunejob"
CONFIG_KEY = "job.json"
CONFIG_ANNOTATION = "sectune.io/trainer-config"
CONFIG_DIR = "/etc/sectune"
CONTAINER = "trainer"
RENDEZVOUS_PORT = 29500


def child_name(job_name: str) -> str:
    """Predictable name of every child: <job>-train."""
    return f"{job_name}-train"


def labels(job_name: str) -> dict[str, str]:
    return pods.labels(JOB_LABEL, "sectune-trainer", job_name)


def trainer_config(name: str, spec: FineTuneJobSpec) -> dict[str, Any]:
    """What the trainer reads: the job contract without the Kubernetes-only fields."""
    data = spec.model_dump(mode="json", by_alias=True, exclude=set())
    for key in CLUSTER_ONLY_FIELDS["spec"]:
        data.pop(key, None)
    for key in CLUSTER_ONLY_FIELDS["resources"]:
        data["resources"].pop(key, None)
    return {
        "name": name,
        "spec": JobSpec.model_validate(data).model_dump(mode="json", by_alias=True),
    }


def trainer_config_json(name: str, spec: FineTuneJobSpec) -> str:
    """The file the trainer reads (/etc/sectune/job.json), as the pod annotation holds it."""
    return json.dumps(trainer_config(name, spec), sort_keys=True, separators=(",", ":"))


def pod_trainer_config(template_annotations: dict[str, str] | None) -> dict[str, Any]:
    """The trainer's contract from a Job's pod template annotations (what the kubelet writes
    to /etc/sectune/job.json)."""
    return dict(json.loads((template_annotations or {})[CONFIG_ANNOTATION]))


def build_service(name: str) -> dict[str, Any]:
    """Headless Service giving each Indexed Job pod a stable DNS name for rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": child_name(name), "labels": labels(name)},
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_LABEL: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT}],
        },
    }


def _command(name: str, spec: FineTuneJobSpec) -> list[str]:
    arguments = [*TRAIN_ARGS, f"{CONFIG_DIR}/{CONFIG_KEY}"]
    train = ["-m", TRAIN_MODULE, *arguments]
    resources = spec.resources
    processes = max(resources.gpus, 1)
    if processes * resources.nodes == 1:
        return ["sectune", *arguments]
    master = f"{child_name(name)}-0.{child_name(name)}"
    if resources.distributed and resources.distributed.strategy == "deepspeed":
        # The trainer builds the DeepSpeed configuration from the job (training/distributed.py).
        # The standard launcher is torch's elastic agent on every node: no pdsh or ssh in a pod.
        return [
            "accelerate", "launch",
            "--use_deepspeed",
            "--deepspeed_multinode_launcher", "standard",
            "--num_machines", str(resources.nodes),
            "--num_processes", str(processes * resources.nodes),
            "--machine_rank", "$(JOB_COMPLETION_INDEX)",
            "--main_process_ip", master,
            "--main_process_port", str(RENDEZVOUS_PORT),
            *train,
        ]  # fmt: skip
    return [
        "torchrun",
        "--nnodes", str(resources.nodes),
        "--nproc_per_node", str(processes),
        "--node_rank", "$(JOB_COMPLETION_INDEX)",
        "--master_addr", master,
        "--master_port", str(RENDEZVOUS_PORT),
        *train,
    ]  # fmt: skip


def _env(spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    credentials = spec.output.credentials
    env = [
        *pods.cache_env(),
        {"name": "SECTUNE_METRICS_PORT", "value": str(METRICS_PORT)},
        *pods.storage_env(credentials.name if credentials else None),
    ]
    if spec.hf_token_secret:
        ref = {"name": spec.hf_token_secret.name, "key": "HF_TOKEN"}
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
    return env


def _resources(spec: FineTuneJobSpec, settings: Settings) -> dict[str, Any]:
    return pods.compute(
        spec.resources.cpu or settings.default_cpu,
        spec.resources.memory or settings.default_memory,
        spec.resources.gpus,
    )


def build_job(name: str, spec: FineTuneJobSpec, settings: Settings) -> dict[str, Any]:
    """The training Job (Indexed when nodes > 1)."""
    resources = spec.resources
    multi_node = resources.nodes > 1
    pod_labels = labels(name)
    job_labels = dict(pod_labels)
    if spec.queue_name:
        job_labels["kueue.x-k8s.io/queue-name"] = spec.queue_name
    container = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": _command(name, spec),
        "env": _env(spec),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": _resources(spec, settings),
        "securityContext": pods.RESTRICTED,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": spec.service_account_name or "default",
        "automountServiceAccountToken": False,
        "securityContext": pods.POD_SECURITY,
        "containers": [container],
        "volumes": [
            {
                "name": "config",
                "downwardAPI": {
                    "items": [
                        {
                            "path": CONFIG_KEY,
                            "fieldRef": {
                                "fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"
                            },
                        }
                    ]
                },
            },
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shared_memory}},
        ],
        **pods.placement(resources),
    }
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    if multi_node:
        pod_spec["subdomain"] = child_name(name)
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        # Kueue admits a suspended Job; otherwise spec.suspend is the user's.
        "suspend": spec.suspend or bool(spec.queue_name),
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        # `sectune train` exits: retrying cannot fix these.
                        "values": [int(ExitCode.BAD_INPUT), int(ExitCode.GATES_FAILED)],
                    },
                },
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {
            "metadata": {
                "labels": pod_labels,
                "annotations": {CONFIG_ANNOTATION: trainer_config_json(name, spec)},
            },
            "spec": pod_spec,
        },
    }
    if multi_node:
        job_spec |= {
            "completionMode": "Indexed",
            "completions": resources.nodes,
            "parallelism": resources.nodes,
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child_name(name),
            "labels": job_labels,
            "annotations": pods.EXCEPTIONS,
        },
        "spec": job_spec,
    }


def build_network_policy(name: str, settings: Settings) -> dict[str, Any]:
    """Training pods accept their own job's pods (rendezvous and the collective's ports) and
    metrics scrapes from the operator's and the monitoring namespace; nothing else."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": child_name(name), "labels": labels(name)},
        "spec": {
            "podSelector": {"matchLabels": {JOB_LABEL: name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {JOB_LABEL: name}}}]},
                {
                    "from": [
                        pods.from_namespaces(
                            [settings.operator_namespace, settings.monitoring_namespace]
                        )
                    ],
                    "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
                },
            ],
        },
    }
