"""The API models and the CRDs generated from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sectune.config import (
    CLUSTER_ONLY_FIELDS,
    JobSpec,
    ManifestError,
    load_manifest,
    parse_manifest,
)
from sectune.yamlio import load_yaml
from sectune_operator import crd
from sectune_operator.api import ClusterResources, FineTuneJobSpec

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_match_the_models():
    rendered = crd.render_all()
    for directory in (crd.CRD_DIR, crd.CHART_CRD_DIR):
        for name, text in rendered.items():
            committed = directory / name
            assert committed.exists(), f"{committed} missing: run `make crds`"
            assert committed.read_text() == text, (
                f"{committed} drifted from the models: run `make crds`"
            )


def _properties_without_description(node: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, prop in (node.get("properties") or {}).items():
        if name in ("apiVersion", "kind", "metadata"):
            continue
        if not prop.get("description"):
            missing.append(f"{path}.{name}")
        missing += _properties_without_description(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        missing += _properties_without_description(node["items"], f"{path}[]")
    return missing


@pytest.mark.parametrize("name", sorted(crd.render_all()))
def test_every_crd_field_is_described(name):
    document = load_yaml(crd.render_all()[name])
    schema = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _properties_without_description(schema, document["spec"]["names"]["kind"]) == []


def test_crd_spec_never_preserves_unknown_fields():
    document = load_yaml(crd.render_all()["sectune.io_finetunejobs.yaml"])
    spec = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert "x-kubernetes-preserve-unknown-fields" not in spec
    # The one free-form field is the user's JSON Schema for extraction outputs.
    preserved = [
        path
        for path, node in _walk(spec, "spec")
        if node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert preserved == ["spec.task.outputSchema"]


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for name, prop in (node.get("properties") or {}).items():
        yield from _walk(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


def test_cluster_only_fields_are_exactly_what_the_operator_adds():
    added = set(FineTuneJobSpec.model_fields) - set(JobSpec.model_fields)
    aliases = {FineTuneJobSpec.model_fields[f].alias for f in added}
    assert aliases == set(CLUSTER_ONLY_FIELDS["spec"])
    resources = {
        ClusterResources.model_fields[f].alias
        for f in set(ClusterResources.model_fields)
        - set(JobSpec.model_fields["resources"].annotation.model_fields)  # type: ignore[union-attr]
    }
    assert resources == set(CLUSTER_ONLY_FIELDS["resources"])


def test_defaults_follow_the_seed_guidance():
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://org/m"},
            "dataset": {"train": "s3://b/t.jsonl"},
            "task": {"labels": ["a", "b"]},
        }
    )
    assert spec.dataset.validation_split == 0.2
    assert spec.hyperparameters.epochs == 3
    assert spec.method.r == 16 and spec.method.alpha == 32
    assert spec.hyperparameters.batch_size * spec.hyperparameters.gradient_accumulation == 16
    assert spec.hyperparameters.resolved_learning_rate("lora") == 2e-4
    assert spec.hyperparameters.resolved_learning_rate("full") == 2e-5


def test_manifest_errors_name_the_field_and_the_fix(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        "apiVersion: sectune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: j}\n"
        "spec:\n  baseModel: {uri: hf://o/m}\n  dataset: {train: s3://b/t.jsonl}\n"
        "  task: {labels: [a, b]}\n  method: {type: qlora}\n"
    )
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest)
    assert "baseModel.quantization" in str(error.value)
    assert "set quantization: nf4" in str(error.value)
    assert str(manifest) in str(error.value)


def test_manifest_reports_cluster_only_fields_and_resolves_relative_data(tmp_path):
    document = {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": {
            "baseModel": {"uri": "hf://o/m"},
            "dataset": {"train": "file://data/t.jsonl"},
            "task": {"labels": ["a", "b"]},
            "resources": {"gpus": 0, "memory": "8Gi"},
            "queueName": "gpu",
        },
    }
    manifest = parse_manifest(document, base_dir=tmp_path)
    assert manifest.ignored_fields == ["spec.queueName", "spec.resources.memory"]
    assert manifest.spec.dataset.train == f"file://{tmp_path}/data/t.jsonl"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"kind": "Job"}, "sectune run takes kind: FineTuneJob"),
        ({"kind": "FineTuneJob", "apiVersion": "v1"}, "use sectune.io/v1alpha1"),
        (
            {
                "kind": "FineTuneJob",
                "apiVersion": "sectune.io/v1alpha1",
                "metadata": {"name": "Bad_Name"},
            },
            "metadata.name 'Bad_Name': at most 52 characters",
        ),
        (
            {
                "kind": "FineTuneJob",
                "apiVersion": "sectune.io/v1alpha1",
                "metadata": {"name": "ok"},
            },
            "spec is missing",
        ),
    ],
)
def test_manifest_envelope_errors(document, message):
    with pytest.raises(ManifestError, match=message):
        parse_manifest(document)


def test_the_control_plane_never_imports_torch():
    import subprocess
    import sys

    code = (
        "import sys, sectune.config, sectune_operator.api, sectune_operator.crd, "
        "sectune_operator.handlers, sectune_operator.status\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_a_schedule_template_may_gate_on_the_previous_run_a_job_may_not_without_one():
    """`overBaseline: previous` in a schedule's template: each run gets the schedule's last
    success as its previousVersion, so the template needs none; a FineTuneJob does."""
    from sectune.config import PREVIOUS_GATE_MESSAGE
    from sectune_operator.api import FineTuneJobSpec, FineTuneScheduleSpec

    template = {
        "baseModel": {"uri": "s3://m/base"},
        "dataset": {"train": "s3://d/train.jsonl"},
        "task": {"labels": ["benign", "malicious"]},
        "evaluation": {"gates": [{"metric": "accuracy", "overBaseline": "previous", "min": 0}]},
    }
    FineTuneScheduleSpec.model_validate({"schedule": "0 3 * * *", "jobTemplate": template})
    with pytest.raises(ValidationError, match="overBaseline: previous needs"):
        FineTuneJobSpec.model_validate(template)
    with pytest.raises(ValidationError, match="method must be lora or qlora"):
        FineTuneScheduleSpec.model_validate(
            {"schedule": "0 3 * * *", "jobTemplate": {**template, "method": {"type": "full"}}}
        )
    # The CRDs say the same to the API server.
    job = load_yaml(crd.render_all()["sectune.io_finetunejobs.yaml"])
    schedule = load_yaml(crd.render_all()["sectune.io_finetuneschedules.yaml"])

    def messages(document: dict[str, Any], *path: str) -> list[str]:
        node = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for step in path:
            node = node["properties"][step]
        return [rule["message"] for rule in node.get("x-kubernetes-validations", [])]

    assert PREVIOUS_GATE_MESSAGE in messages(job, "spec", "evaluation")
    assert PREVIOUS_GATE_MESSAGE not in messages(schedule, "spec", "jobTemplate", "evaluation")
