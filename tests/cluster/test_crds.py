"""The CRDs on a real API server: they install, explain themselves, accept every example,
refuse bad manifests naming the field, keep a started job's spec fixed, and agree with the
pydantic models they were generated from."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from sectune.config import ManifestError, parse_manifest
from sectune.yamlio import load_yaml_all
from sectune_operator.api import AdapterDeploymentSpec, FineTuneJobSpec, FineTuneScheduleSpec

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION = "sectune.io", "v1alpha1"

VALID_JOB: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid"},
    "spec": {
        "baseModel": {"uri": "s3://models/smollm2"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "task": {"type": "classification", "labels": ["benign", "malicious"]},
    },
}
VALID_DEPLOYMENT: dict[str, Any] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "AdapterDeployment",
    "metadata": {"name": "valid"},
    "spec": {
        "baseModel": {"uri": "s3://models/smollm2"},
        "adapters": [
            {
                "name": "triage",
                "versions": [
                    {"version": "v1", "source": {"fineTuneJob": "triage-v1"}, "traffic": 90},
                    {"version": "v2", "source": {"fineTuneJob": "triage-v2"}, "traffic": 10},
                ],
            }
        ],
    },
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `base` with spec.<path> set (dots separate keys; value None deletes)."""
    doc = copy.deepcopy(base)
    node = doc["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    return doc


# (case id, manifest, text the API server's message must contain)
BAD_JOBS = [
    ("one-label", _with(VALID_JOB, "task.labels", ["benign"]), "task.labels"),
    ("same-label-twice", _with(VALID_JOB, "task.labels", ["x", "x"]), "task.labels"),
    (
        "extraction-without-schema",
        _with(VALID_JOB, "task", {"type": "extraction"}),
        "task.outputSchema",
    ),
    ("qlora-without-4bit", _with(VALID_JOB, "method", {"type": "qlora"}), "baseModel.quantization"),
    (
        "gpus-without-distributed",
        _with(VALID_JOB, "resources", {"gpus": 2}),
        "resources.distributed",
    ),
    (
        "nodes-without-gpus",
        _with(VALID_JOB, "resources", {"gpus": 0, "nodes": 2, "distributed": {}}),
        "resources.gpus",
    ),
    ("split-of-one", _with(VALID_JOB, "dataset.validationSplit", 1.0), "validationSplit"),
    ("negative-split", _with(VALID_JOB, "dataset.validationSplit", -0.1), "validationSplit"),
    (
        "zero-learning-rate",
        _with(VALID_JOB, "hyperparameters", {"learningRate": 0}),
        "learningRate",
    ),
    (
        "learning-rate-above-one",
        _with(VALID_JOB, "hyperparameters", {"learningRate": 1.5}),
        "learningRate",
    ),
    ("zero-epochs", _with(VALID_JOB, "hyperparameters", {"epochs": 0}), "epochs"),
    ("lora-rank-zero", _with(VALID_JOB, "method", {"r": 0}), "spec.method.r"),
    ("lora-rank-huge", _with(VALID_JOB, "method", {"r": 1024}), "spec.method.r"),
    ("seq-length-tiny", _with(VALID_JOB, "hyperparameters", {"maxSeqLength": 8}), "maxSeqLength"),
    (
        "seq-length-huge",
        _with(VALID_JOB, "hyperparameters", {"maxSeqLength": 10**6}),
        "maxSeqLength",
    ),
    (
        "http-uri",
        _with(VALID_JOB, "dataset.train", "http://example.com/train.jsonl"),
        "dataset.train",
    ),
    (
        "credentials-in-uri",
        _with(VALID_JOB, "dataset.train", "s3://AKIA1234:secret@bucket/t.jsonl"),
        "dataset.train",
    ),
    ("unknown-method", _with(VALID_JOB, "method", {"type": "prompt-tuning"}), "method.type"),
    ("unknown-spec-field", _with(VALID_JOB, "learningRate", 0.1), "learningRate"),
    (
        "inline-access-key",
        _with(VALID_JOB, "output", {"uri": "s3://out", "accessKey": "AKIA"}),
        "accessKey",
    ),
    (
        "gate-without-bounds",
        _with(VALID_JOB, "evaluation", {"gates": [{"metric": "accuracy"}]}),
        "evaluation.gates",
    ),
    (
        "per-class-gate-without-class",
        _with(VALID_JOB, "evaluation", {"gates": [{"metric": "recall", "min": 0.9}]}),
        "per-class",
    ),
    (
        "unknown-gate-metric",
        _with(VALID_JOB, "evaluation", {"gates": [{"metric": "vibes", "min": 1}]}),
        "metric",
    ),
    ("cleanup-policy", _with(VALID_JOB, "cleanupPolicy", "Destroy"), "cleanupPolicy"),
    (
        "classifier-head-for-extraction",
        _with(
            VALID_JOB,
            "task",
            {"type": "extraction", "outputSchema": {"type": "object"}, "head": "classifier"},
        ),
        "task.head",
    ),
    (
        "class-weights-for-extraction",
        _with(
            VALID_JOB,
            "task",
            {"type": "extraction", "outputSchema": {"type": "object"}, "classWeights": "balanced"},
        ),
        "task.classWeights",
    ),
    ("chat-rows-for-classification", _with(VALID_JOB, "dataset.format", "chat"), "dataset.format"),
    # Not implemented yet, and said so:
    (
        "deepspeed-with-4-bit-base",
        _with(
            _with(
                _with(VALID_JOB, "baseModel.quantization", "nf4"),
                "method",
                {"type": "qlora"},
            ),
            "resources",
            {"gpus": 4, "distributed": {"strategy": "deepspeed"}},
        ),
        "use strategy: ddp for QLoRA",
    ),
    (
        "zero3-full-with-baseline",
        _with(
            _with(VALID_JOB, "method", {"type": "full"}),
            "resources",
            {"gpus": 4, "distributed": {"strategy": "deepspeed", "zeroStage": 3}},
        ),
        "evaluation.baseline",
    ),
    (
        "zero3-previous-version",
        _with(
            _with(VALID_JOB, "evaluation", {"previousVersion": {"uri": "s3://a/triage"}}),
            "resources",
            {"gpus": 4, "distributed": {"strategy": "deepspeed", "zeroStage": 3}},
        ),
        "evaluation.previousVersion",
    ),
    ("deadline-too-short", _with(VALID_JOB, "activeDeadlineSeconds", 10), "activeDeadlineSeconds"),
    # Accepted before, and failed (or misled) only after hours of work:
    (
        "gate-min-above-max",
        _with(VALID_JOB, "evaluation", {"gates": [{"metric": "accuracy", "min": 0.9, "max": 0.5}]}),
        "can never pass",
    ),
    ("template-without-text", _with(VALID_JOB, "task.template", "Classify this alert."), "{text}"),
    (
        "name-too-long-for-children",
        {**VALID_JOB, "metadata": {"name": "a" * 53}},
        "metadata.name: at most 52",
    ),
    ("name-with-dots", {**VALID_JOB, "metadata": {"name": "triage.v2"}}, "metadata.name"),
    # Accepted before, and then did something other than what the manifest says:
    (
        "full-fine-tune-of-a-4-bit-base",
        _with(_with(VALID_JOB, "baseModel.quantization", "nf4"), "method", {"type": "full"}),
        "method full and continued-pretraining train every weight",
    ),
    (
        "format-gate-on-classification",
        _with(VALID_JOB, "evaluation", {"gates": [{"metric": "formatCompliance", "min": 0.99}]}),
        "formatCompliance of a classification task is always 1.0",
    ),
    (
        "hf-dataset",
        _with(VALID_JOB, "dataset.train", "hf://datasets/org/alerts"),
        "hf:// datasets are not implemented yet",
    ),
]

_V = "adapters.0.versions"
BAD_DEPLOYMENTS = [
    ("traffic-over-100", _with(VALID_DEPLOYMENT, f"{_V}.1.traffic", 20), "traffic"),
    (
        "duplicate-adapter-names",
        _with(VALID_DEPLOYMENT, "adapters", VALID_DEPLOYMENT["spec"]["adapters"] * 2),
        "adapters",
    ),
    ("adapter-name-not-dns", _with(VALID_DEPLOYMENT, "adapters.0.name", "Alert_Triage"), "name"),
    (
        "short-sha256",
        _with(VALID_DEPLOYMENT, f"{_V}.0.source", {"uri": "s3://a/b", "sha256": "abc"}),
        "sha256",
    ),
    (
        "uri-without-sha256",
        _with(VALID_DEPLOYMENT, f"{_V}.0.source", {"uri": "s3://a/b"}),
        "sha256",
    ),
    (
        "two-sources",
        _with(
            VALID_DEPLOYMENT,
            f"{_V}.0.source",
            {"uri": "s3://a/b", "sha256": "a" * 64, "fineTuneJob": "x"},
        ),
        "source",
    ),
    ("no-adapters", _with(VALID_DEPLOYMENT, "adapters", []), "adapters"),
]


def _create(api_client: Any, namespace: str, doc: dict[str, Any]) -> dict[str, Any]:
    plural = {"FineTuneJob": "finetunejobs", "AdapterDeployment": "adapterdeployments"}[doc["kind"]]
    return client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, plural, doc, field_validation="Strict"
    )


def _patch_job(api_client: Any, namespace: str, body: dict[str, Any], status: bool = False) -> None:
    api = client.CustomObjectsApi(api_client)
    patch = (
        api.patch_namespaced_custom_object_status if status else api.patch_namespaced_custom_object
    )
    patch(GROUP, VERSION, namespace, "finetunejobs", "valid", body)


def _pydantic_accepts(doc: dict[str, Any]) -> bool:
    model = {
        "FineTuneJob": FineTuneJobSpec,
        "AdapterDeployment": AdapterDeploymentSpec,
        "FineTuneSchedule": FineTuneScheduleSpec,
    }[doc["kind"]]
    try:
        model.model_validate(doc["spec"])
        if doc["kind"] == "FineTuneJob":
            parse_manifest(doc)
    except (ValidationError, ManifestError):
        return False
    return True


@pytest.mark.parametrize(
    ("case", "doc", "field"),
    BAD_JOBS + BAD_DEPLOYMENTS,
    ids=[c[0] for c in BAD_JOBS + BAD_DEPLOYMENTS],
)
def test_bad_manifest_is_refused_naming_the_field(crds, api_client, namespace, case, doc, field):
    with pytest.raises(ApiException) as refused:
        _create(api_client, namespace, doc)
    assert refused.value.status in (400, 422), refused.value.body
    assert field in refused.value.body, refused.value.body
    # The model the CRD was generated from refuses it too.
    assert not _pydantic_accepts(doc)


def test_crds_explain_their_fields(crds):
    explained = crds.kubectl("explain", "finetunejob.spec.dataset.validationSplit")
    assert explained.returncode == 0, explained.stderr
    assert "Fraction of the training data held out" in explained.stdout
    explained = crds.kubectl("explain", "adep.spec.adapters.versions.traffic")
    assert "Percent of the adapter's requests" in explained.stdout


def _example_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted((ROOT / "examples").glob("**/*.yaml")):
        for doc in load_yaml_all(path.read_text()):
            if doc.get("kind") in ("FineTuneJob", "AdapterDeployment", "FineTuneSchedule"):
                documents.append((str(path.relative_to(ROOT)), doc))
    return documents


EXAMPLES = _example_documents()


@pytest.mark.parametrize(("path", "doc"), EXAMPLES, ids=[p for p, _ in EXAMPLES])
def test_every_example_applies(crds, namespace, path, doc):
    applied = crds.kubectl("apply", "-n", namespace, "--validate=strict", "-f", str(ROOT / path))
    assert applied.returncode == 0, applied.stderr
    assert _pydantic_accepts(doc)


def test_examples_cover_every_kind():
    kinds = {doc["kind"] for _, doc in EXAMPLES}
    assert kinds == {"FineTuneJob", "AdapterDeployment", "FineTuneSchedule"}
    assert len(EXAMPLES) >= 4


def _distributed(rng: random.Random, method: str, base: dict[str, Any]) -> dict[str, Any]:
    """A valid distributed setting (with a quantized base the strategy is ddp; ZeRO-3 only for
    adapters, since the default base-model baseline of full fine-tuning is not there yet)."""
    options: list[dict[str, Any]] = [{"strategy": "ddp"}]
    if base["quantization"] == "none":
        options.append({"strategy": "deepspeed", "zeroStage": 2, "offload": "cpu"})
        if method == "lora":
            options.append({"strategy": "deepspeed", "zeroStage": 3})
    return rng.choice(options)


def _random_valid_job(rng: random.Random, index: int) -> dict[str, Any]:
    method = rng.choice(["lora", "qlora", "full", "continued-pretraining"])
    gpus, nodes = rng.choice([(0, 1), (1, 1), (4, 1), (8, 2)])
    task = rng.choice(
        [
            {
                "type": "classification",
                "labels": rng.sample(
                    ["low", "medium", "high", "critical", "info"], rng.randint(2, 5)
                ),
            },
            {
                "type": "extraction",
                "outputSchema": {"type": "object", "properties": {"user": {"type": "string"}}},
            },
            {"type": "generation"},
        ]
    )
    spec: dict[str, Any] = {
        "baseModel": {
            "uri": rng.choice(["hf://org/model@main", "s3://m/base", "file:///models/x.gguf"]),
            "quantization": "nf4"
            if method == "qlora"
            else "none"
            if method in ("full", "continued-pretraining")  # every weight trains: no 4-bit
            else rng.choice(["none", "nf4"]),
        },
        "dataset": {
            "train": "s3://d/train.jsonl",
            "validationSplit": round(rng.uniform(0, 0.99), 3),
            "format": "classification"
            if task["type"] == "classification"
            else rng.choice(["instruction", "chat"]),
        },
        "task": task,
        "method": {
            "type": method,
            "r": rng.randint(1, 512),
            "alpha": rng.randint(1, 4096),
            "dropout": round(rng.uniform(0, 0.9), 2),
        },
        "hyperparameters": {
            "learningRate": rng.choice([1e-5, 2e-4, 0.5]),
            "epochs": rng.randint(1, 10),
            "maxSeqLength": rng.choice([16, 512, 131072]),
        },
        "resources": {"gpus": gpus, "nodes": nodes},
        "evaluation": {
            "gates": [{"metric": "macroF1", "min": 0.5}, {"metric": "latencyP95Ms", "max": 500}]
        },
        "suspend": rng.random() < 0.3,
    }
    if gpus * nodes > 1:
        spec["resources"]["distributed"] = _distributed(rng, method, spec["baseModel"])
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": f"gen-{index}"},
        "spec": spec,
    }


def test_generated_valid_jobs_are_accepted_by_both(crds, api_client, namespace):
    rng = random.Random(7)
    for index in range(15):
        doc = _random_valid_job(rng, index)
        assert _pydantic_accepts(doc), doc
        _create(api_client, namespace, doc)


def test_started_job_spec_is_immutable_except_suspend(crds, api_client, namespace):
    api = client.CustomObjectsApi(api_client)
    _create(api_client, namespace, VALID_JOB)
    _patch_job(
        api_client,
        namespace,
        {"status": {"phase": "Training", "startTime": "2026-11-23T07:00:00Z"}},
        status=True,
    )
    with pytest.raises(ApiException) as refused:
        _patch_job(api_client, namespace, {"spec": {"hyperparameters": {"epochs": 9}}})
    assert refused.value.status == 422
    assert "immutable once the job has started" in refused.value.body

    _patch_job(api_client, namespace, {"spec": {"suspend": True}})
    job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", "valid")
    assert job["spec"]["suspend"] is True


def test_spec_of_a_job_not_yet_started_can_change(crds, api_client, namespace):
    api = client.CustomObjectsApi(api_client)
    _create(api_client, namespace, VALID_JOB)
    _patch_job(api_client, namespace, {"spec": {"hyperparameters": {"epochs": 9}}})
    job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs", "valid")
    assert job["spec"]["hyperparameters"]["epochs"] == 9
    # Defaults the API server filled in from the schema.
    assert job["spec"]["dataset"]["validationSplit"] == 0.2
    assert job["spec"]["method"] == {
        "type": "lora",
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "targetModules": [],
    }
