"""The data audit where users meet it: `sectune train` (the pod's command) refuses data that
breaks a dataset.quality limit before loading the model, with the bad-data exit code and the
counts in its result, and the operator shows them in status; `sectune data audit` and
`sectune data review apply` as an analyst runs them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from sectune.contract import ExitCode, TrainerResult
from sectune.yamlio import load_yaml
from sectune_operator.status import derive_status
from support.jobs import sectune

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
ATTACK = ROOT / "examples" / "attack-tactics" / "data"
NOW = "2026-12-03T10:00:00Z"


def _rows(name: str, count: int) -> list[dict]:
    lines = (ATTACK / name).read_text().splitlines()[:count]
    return [{k: r[k] for k in ("id", "text", "label")} for r in map(json.loads, lines)]


def _leaky_job(tmp_path: Path, **quality: object) -> tuple[Path, dict]:
    held = _rows("validation.jsonl", 120)
    copies = [
        {
            "id": f"copy-{i}",
            "text": r["text"].replace(" ", "  ") + " (seen again)",
            "label": r["label"],
        }
        for i, r in enumerate(held[:30])
    ]
    train, test = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows("train.jsonl", 600) + copies))
    test.write_text("".join(json.dumps(r) + "\n" for r in held))
    labels = load_yaml((ROOT / "examples/attack-tactics/finetunejob.yaml").read_text())["spec"][
        "task"
    ]["labels"]
    spec = {
        # Never loaded: the audit fails the job first (a path that does not exist proves it).
        "baseModel": {"uri": f"file://{tmp_path}/no-model-here"},
        "dataset": {
            "train": f"file://{train}",
            "validation": f"file://{test}",
            "quality": quality,
        },
        "task": {"type": "classification", "labels": labels},
        "resources": {"gpus": 0},
        "output": {"uri": f"file://{tmp_path}/out"},
    }
    return train, spec


def test_train_refuses_leaky_data_before_the_model_and_status_shows_the_counts(tmp_path):
    _, spec = _leaky_job(tmp_path, maxLeakage=0.05)
    config, termination = tmp_path / "config.json", tmp_path / "termination-log"
    config.write_text(json.dumps({"name": "leaky", "spec": spec}))

    run = sectune("train", "--config", str(config), "--termination-log", str(termination))

    assert run.returncode == ExitCode.BAD_INPUT, run.stderr[-3000:]
    assert "dataset.quality.maxLeakage:" in run.stderr
    assert "no-model-here" not in run.stderr  # failed before the base model was looked for
    assert not (tmp_path / "out").exists()  # nothing published
    result = TrainerResult.parse(termination.read_text(), run.returncode)
    assert result is not None and result.reason == "DataQualityFailed"
    assert result.dataset is not None and result.dataset.quality is not None
    quality = result.dataset.quality
    assert quality.leaked_held_out >= 30 and quality.held_out_rows == 120
    assert quality.broken_limits[0].startswith("dataset.quality.maxLeakage: ")
    assert "(seen again)" not in termination.read_text()  # counts and ids, never row text

    # The operator reads the same message from the pod and shows the counts in status,
    # in the shape the CRD declares.
    pod = {
        "metadata": {"name": "leaky-train-0", "creationTimestamp": NOW},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {
                        "terminated": {
                            "exitCode": run.returncode,
                            "message": termination.read_text(),
                        }
                    },
                }
            ],
        },
    }
    job = {
        "spec": {},
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]
        },
    }
    status = derive_status(job, [pod], {"phase": "Preparing"}, 1, NOW, attempts=1)
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DataQualityFailed" and "maxLeakage" in failed["message"]
    shown = status["dataset"]["quality"]
    assert shown["leakedHeldOut"] == quality.leaked_held_out and shown["brokenLimits"]
    crd = load_yaml((ROOT / "crds" / "sectune.io_finetunejobs.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    Draft202012Validator(schema).validate(status)


def test_audit_then_review_then_train_on_the_reviewed_version(tmp_path):
    train, spec = _leaky_job(tmp_path)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        json.dumps({"apiVersion": "sectune.io/v1alpha1", "kind": "FineTuneJob",
                    "metadata": {"name": "leaky"}, "spec": spec})
    )  # fmt: skip

    audited = sectune("data", "audit", str(manifest), "--out", str(tmp_path / "review"))

    assert audited.returncode == 0, audited.stderr[-3000:]
    assert "held-out rows leaking from training" in audited.stderr
    with (tmp_path / "review" / "review.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    leaking = [line for line in lines if "leakage" in line["finding"]]
    assert {line["row"] for line in leaking} >= {f"copy-{i}" for i in range(30)}
    for line in lines:  # drop every training copy of a held-out row; relabel one suggestion
        line["decision"] = "drop" if "leakage" in line["finding"] else ""
    relabel = next(line for line in lines if line["finding"] == "label-error")
    relabel |= {"decision": "relabel", "newLabel": relabel["suggested"]}
    reviewed = tmp_path / "review" / "decided.csv"
    with reviewed.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)

    out = tmp_path / "train-reviewed.jsonl"
    applied = sectune(
        "data", "review", "apply", "--data", str(train), "--review", str(reviewed),
        "--out", str(out), "--reviewer", "soc-lead", "--manifest", str(manifest),
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr[-3000:]
    record = json.loads(Path(f"{out}.provenance.json").read_text())
    assert record["counts"]["drop"] == len(leaking) and record["counts"]["relabel"] == 1
    assert record["reviewer"] == "soc-lead"

    spec["dataset"] |= {"train": f"file://{out}", "quality": {"maxLeakage": 0.05}}
    manifest.write_text(json.dumps({"apiVersion": "sectune.io/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "leaky"}, "spec": spec}))  # fmt: skip
    again = sectune("data", "audit", str(manifest), "--out", str(tmp_path / "review2"), "--json")
    assert again.returncode == 0, again.stderr[-3000:]  # the limit now holds
    checked = sectune("data", "check", str(manifest))
    assert checked.returncode == 0, checked.stderr[-3000:]
    report = json.loads(checked.stdout)
    assert report["provenance"]["reviewer"] == "soc-lead"
    assert report["provenance"]["matchesData"] is True
    assert report["audit"]["leakedTotal"] < 0.05 * 120
