"""What every pod the operator creates shares: the user it runs as, its restricted security
context, its labels, where caches live, how storage keys reach it, its compute, and the
namespace selector its NetworkPolicy admits callers by. Pure values and functions, used by
the training Job's and the servers' builders alike."""

from __future__ import annotations

from typing import Any

from sectune_operator.api import Placement, Toleration

EXCEPTIONS = {
    "checkov.io/skip1": "CKV_K8S_43=The image is the operator's setting or the spec's; pin it by "
    "digest there (image@sha256:...)",
    "checkov.io/skip2": "CKV_K8S_35=Storage keys reach boto3 as AWS_* variables by secretKeyRef; "
    "they are never in the spec, the pod's config or a log",
    "checkov.io/skip3": "CKV_K8S_15=IfNotPresent: GPU nodes must not pull multi-GB images on every "
    "start; pin by digest for immutability",
}
"""Findings of Kubernetes best-practice checkers that the operator's pods answer by design
(tests/cluster/test_install.py runs checkov on what the builders render)."""
UID = 10001
"""User and group of every pod the operator creates (the images' own user): non-root, and above
the range host accounts use."""
STORAGE_ENV = {
    "AWS_ACCESS_KEY_ID": ("AWS_ACCESS_KEY_ID", False),
    "AWS_SECRET_ACCESS_KEY": ("AWS_SECRET_ACCESS_KEY", False),
    "AWS_ENDPOINT_URL": ("AWS_ENDPOINT_URL", True),
    "AWS_REGION": ("AWS_REGION", True),
}
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""The container security context of the Pod Security Standards' restricted profile."""
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "fsGroup": UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""The pod security context: the images' own non-root user."""


def labels(owner_label: str, component: str, name: str) -> dict[str, str]:
    """The labels of every child of `name`: the owner's label, and the recommended ones."""
    return {
        owner_label: name,
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": "sectune-operator",
    }


def cache_env() -> list[dict[str, Any]]:
    """A writable home and the caches on the pod's cache volume (the root filesystem is
    read-only)."""
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "SECTUNE_CACHE", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
    ]


def storage_env(secret: str | None) -> list[dict[str, Any]]:
    """The storage keys of `secret` as the AWS_* variables boto3 reads, by secretKeyRef (never
    in the spec, the pod's config or a log); none without a Secret."""
    if secret is None:
        return []
    return [
        {
            "name": variable,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}},
        }
        for variable, (key, optional) in STORAGE_ENV.items()
    ]


def compute(cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    """Limits, and requests equal to them but for GPUs (extended resources need no request)."""
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"limits": limits, "requests": {k: v for k, v in limits.items() if "gpu" not in k}}


def from_namespaces(names: list[str]) -> dict[str, Any]:
    return {
        "namespaceSelector": {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": sorted(set(names)),
                }
            ]
        }
    }


def placement(where: Placement) -> dict[str, Any]:
    """The pod spec's nodeSelector, tolerations and priorityClassName: those set (an unset one
    is left out, so a spec without them renders as before and rolls no pod)."""
    fields: dict[str, Any] = {
        "nodeSelector": dict(where.node_selector),
        "tolerations": [_toleration(t) for t in where.tolerations],
        "priorityClassName": where.priority_class_name,
    }
    return {key: value for key, value in fields.items() if value}


def _toleration(toleration: Toleration) -> dict[str, Any]:
    """A toleration as a pod spec spells it, unset fields left out."""
    fields = {
        "key": toleration.key,
        "operator": toleration.operator,
        "value": toleration.value,
        "effect": toleration.effect,
        "tolerationSeconds": toleration.toleration_seconds,
    }
    return {name: value for name, value in fields.items() if value is not None}
