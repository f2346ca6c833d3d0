"""Generate the CRDs (crds/*.yaml) from the pydantic models: `python -m sectune_operator.crd`.

The output is a structural OpenAPI v3 schema: every $ref inlined, optional fields as plain
non-required properties, enums and bounds kept, CEL rules (`x-kubernetes-validations`) and factory
defaults from `sectune_operator.cel`, descriptions from the field docstrings (they show in
`kubectl explain`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sectune.config import API_GROUP, API_VERSION, JOB_NAME_PATTERN, MAX_JOB_NAME
from sectune.yamlio import dump_yaml
from sectune_operator.api import (
    AdapterDeploymentSpec,
    AdapterDeploymentStatus,
    FineTuneJobSpec,
    FineTuneJobStatus,
    FineTuneScheduleSpec,
    FineTuneScheduleStatus,
)
from sectune_operator.cel import KubernetesJsonSchema
from sectune_operator.generated import write_or_check
from sectune_operator.schedule import MAX_SCHEDULE_NAME

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
CHART_CRD_DIR = ROOT / "charts" / "sectune" / "files" / "crds"  # the Helm chart's copy

_DROP = {"title", "x-preserve", "x-list-map-keys"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Turn pydantic's JSON Schema into a Kubernetes structural schema."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if node.pop("x-preserve", False):
        return _drop_empty(
            {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "description": node.get("description"),
            }
        )
    list_map_keys = node.get("x-list-map-keys")
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**_inline(target, defs), **{k: v for k, v in node.items() if k not in _DROP}}
        return _inline(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union of {len(branches)} types in a CRD: {node}")
        if node.get("default", 0) is None:
            node.pop("default")
        return _inline({**branches[0], **node}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _inline(value, defs)
        elif key == "additionalProperties" and value is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema 2020 (a number) -> OpenAPI 3.0 (a bound plus a flag).
            out[key.removeprefix("exclusive").lower()], out[key] = value, True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        out.pop("additionalProperties", None)
    if list_map_keys:
        out["x-kubernetes-list-type"] = "map"
        out["x-kubernetes-list-map-keys"] = list_map_keys
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
    return out


def _drop_empty(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if v is not None}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=KubernetesJsonSchema
    )
    defs = schema.pop("$defs", {})
    return _inline(schema, defs)


def _immutable_once_started(spec_schema: dict[str, Any]) -> dict[str, str]:
    """A transition rule: after status.startTime is set, only spec.suspend may change."""
    required = set(spec_schema.get("required", []))
    comparisons = []
    for name in spec_schema["properties"]:
        if name == "suspend":
            continue
        if name in required or "default" in spec_schema["properties"][name]:
            comparisons.append(f"self.spec.{name} == oldSelf.spec.{name}")
        else:
            comparisons.append(
                f"(has(self.spec.{name}) == has(oldSelf.spec.{name}) && "
                f"(!has(self.spec.{name}) || self.spec.{name} == oldSelf.spec.{name}))"
            )
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.startTime) || ("
        + " && ".join(comparisons)
        + ")",
        "message": "spec is immutable once the job has started (status.startTime is set); "
        "only spec.suspend may change. Create a new FineTuneJob for different settings.",
        "reason": "FieldValueForbidden",
    }


def _crd(
    kind: str,
    plural: str,
    short: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    columns: list[dict[str, Any]],
    description: str,
    root_rules: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "sectune", "app.kubernetes.io/part-of": "sectune"},
        },
        "spec": {
            "group": API_GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": ["sectune"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def _column(name: str, path: str, type_: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": type_, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


AGE = _column("Age", ".metadata.creationTimestamp", "date")


def _name_rule(limit: int, why: str) -> dict[str, str]:
    """A kind's name rule: a DNS-1035 label short enough for the children named after it."""
    return {
        "rule": f"size(self.metadata.name) <= {limit} && "
        f"self.metadata.name.matches('{JOB_NAME_PATTERN}')",
        "message": f"metadata.name: at most {limit} characters, lowercase letters, digits and "
        f"'-', starting with a letter ({why})",
    }


JOB_NAME_RULE = _name_rule(
    MAX_JOB_NAME, "the training Job, its Service and pod hostnames are named after it"
)


def finetunejob_crd() -> dict[str, Any]:
    spec = openapi_schema(FineTuneJobSpec)
    return _crd(
        "FineTuneJob",
        "finetunejobs",
        "ftj",
        spec,
        openapi_schema(FineTuneJobStatus),
        [
            _column("Phase", ".status.phase"),
            _column("Model", ".spec.baseModel.uri"),
            _column("Method", ".spec.method.type"),
            _column("Progress", ".status.progress.display"),
            _column("Loss", ".status.progress.loss", "number"),
            _column("Gates", ".status.gatesSummary"),
            _column("Adapter", ".status.adapter.uri", priority=1),
            AGE,
        ],
        "A fine-tuning run: data sanitized, adapter trained, evaluated against gates and "
        "stored with its lineage.",
        [_immutable_once_started(spec), JOB_NAME_RULE],
    )


MAX_SERVING_NAME = 57
"""An AdapterDeployment's Service is <name>-serve, a DNS label of at most 63 characters."""


SERVING_NAME_RULE = _name_rule(MAX_SERVING_NAME, "its Service is named <name>-serve")


def adapterdeployment_crd() -> dict[str, Any]:
    return _crd(
        "AdapterDeployment",
        "adapterdeployments",
        "adep",
        openapi_schema(AdapterDeploymentSpec),
        openapi_schema(AdapterDeploymentStatus),
        [
            _column("Phase", ".status.phase"),
            _column("Ready", ".status.ready"),
            _column("Adapters", ".status.adapterCount", "integer"),
            _column("Revision", ".status.revision", "integer"),
            _column("Endpoint", ".status.endpoint", priority=1),
            AGE,
        ],
        "A base model served with many adapters, hot-swapped from storage with digests "
        "verified, canary traffic and automatic rollback.",
        [SERVING_NAME_RULE],
    )


SCHEDULE_NAME_RULE = _name_rule(MAX_SCHEDULE_NAME, "runs are named <name>-<minute>")


def finetuneschedule_crd() -> dict[str, Any]:
    return _crd(
        "FineTuneSchedule",
        "finetuneschedules",
        "fts",
        openapi_schema(FineTuneScheduleSpec),
        openapi_schema(FineTuneScheduleStatus),
        [
            _column("Schedule", ".spec.schedule"),
            _column("Suspend", ".spec.suspend", "boolean"),
            _column("Last", ".status.lastScheduleTime", "date"),
            _column("Next", ".status.nextScheduleTime", priority=1),
            _column("Last succeeded", ".status.lastSuccessfulJob.name"),
            AGE,
        ],
        "Retraining on a cadence or on drift: FineTuneJobs created from a template, with "
        "concurrency policy and history limits, as CronJob is to Job.",
        [SCHEDULE_NAME_RULE],
    )


def kopf_peering_crd(kind: str, scope: str) -> dict[str, Any]:
    """kopf's peering CRD (`ClusterKopfPeering` or `KopfPeering`): the operator's replicas see
    each other in its objects and only the highest priority acts. Shared with any other
    kopf-based operator in the cluster; kopf keeps free-form status in it."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD: sectune's, and kopf's peering CRDs."""
    header = "# Generated by `make crds` from sectune_operator.api; do not edit.\n"
    kopf = "# Generated by `make crds`: kopf's peering CRD (leader election); do not edit.\n"
    return {
        f"{API_GROUP}_finetunejobs.yaml": header + dump_yaml(finetunejob_crd()),
        f"{API_GROUP}_adapterdeployments.yaml": header + dump_yaml(adapterdeployment_crd()),
        f"{API_GROUP}_finetuneschedules.yaml": header + dump_yaml(finetuneschedule_crd()),
        "kopf.dev_clusterkopfpeerings.yaml": kopf
        + dump_yaml(kopf_peering_crd("ClusterKopfPeering", "Cluster")),
        "kopf.dev_kopfpeerings.yaml": kopf
        + dump_yaml(kopf_peering_crd("KopfPeering", "Namespaced")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, action="append", help="directories to write into")
    parser.add_argument("--check", action="store_true", help="fail if the files differ")
    args = parser.parse_args(argv)
    return write_or_check(
        render_all(),
        args.out or [CRD_DIR, CHART_CRD_DIR],
        args.check,
        "CRDs differ from the models (make crds)",
    )


if __name__ == "__main__":
    sys.exit(main())
