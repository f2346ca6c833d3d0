"""Real training of a tiny Llama on CPU into the real S3 server (MinIO): LoRA, QLoRA, two-process
DDP, two-process DeepSpeed ZeRO-2 and ZeRO-3, resume after preemption, and a failed upload that
must not replace the good adapter."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sectune import artifacts, storage
from sectune.config import load_manifest
from support.jobs import LOGIN_SCHEMA, sectune, write_login_lines
from support.processes import free_port

pytestmark = pytest.mark.e2e


def _report(prefix: str, job: str) -> dict:
    """report.json of the version a job's current.json points at."""
    pointer = artifacts.current(f"{prefix}/{job}")
    assert pointer is not None, "nothing was published"
    return dict(
        json.loads(storage.read_bytes(f"{prefix}/{job}/versions/{pointer['version']}/report.json"))
    )


def _published(bucket: str, job: str) -> tuple[dict, dict]:
    """(current.json, verified manifest) of a job under s3://bucket/adapters."""
    pointer = artifacts.current(f"s3://{bucket}/adapters/{job}")
    assert pointer is not None, "nothing was published"
    version = f"s3://{bucket}/adapters/{job}/versions/{pointer['version']}"
    return pointer, artifacts.verify(version, pointer["sha256"]).as_dict()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_run_writes_a_complete_verified_adapter_to_s3(job_manifest, s3_env, s3_bucket, method):
    spec = {"method": {"type": method}, "output": {"uri": f"s3://{s3_bucket}/adapters"}}
    if method == "qlora":
        spec["baseModel"] = {"quantization": "nf4"}
    manifest = job_manifest(f"tiny-{method}", **spec)

    result = sectune("run", str(manifest))

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Adapter: s3://" in result.stderr
    _, manifest_doc = _published(s3_bucket, f"tiny-{method}")
    files = manifest_doc["files"]
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "report.json",
        "report.html",
        "training-log.jsonl",
    } <= set(files)
    assert {"adapter/tokenizer.json", "adapter/tokenizer_config.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    # The stored adapter is the one the job asked for: its rank and targets, loadable by peft.
    adapter_dir = f"s3://{s3_bucket}/adapters/tiny-{method}/versions/{_published(s3_bucket, f'tiny-{method}')[0]['version']}/adapter"
    adapter_config = json.loads(storage.read_bytes(f"{adapter_dir}/adapter_config.json"))
    asked = load_manifest(manifest).spec.method
    assert adapter_config["r"] == asked.r and adapter_config["lora_alpha"] == asked.alpha
    assert manifest_doc["baseModel"]["quantization"] == ("nf4" if method == "qlora" else "none")
    assert len(manifest_doc["baseModel"]["sha256"]) == 64
    assert manifest_doc["dataset"]["digest"].startswith("sha256:")
    assert (
        manifest_doc["redactions"]["USERNAME"] > 0 and manifest_doc["redactions"]["IP_ADDRESS"] > 0
    )
    report = _report(f"s3://{s3_bucket}/adapters", f"tiny-{method}")
    assert set(report["models"]) == {"base", "fewShot", "tuned", "tfidf"}
    # The data audit's counts travel with the version; its count of rows cut by maxSeqLength
    # (from the tokenizer, before training) is what training then cut.
    audited = report["data"]["audit"]
    assert manifest_doc["dataset"]["quality"]["trainRows"] == audited["trainRows"] > 0
    assert audited["coverage"]["truncation"]["rowsCut"] == report["training"]["truncated"]
    tuned = report["models"]["tuned"]
    # accuracy is the confusion matrix's diagonal over the rows scored, macro-F1 its classes'
    matrix = tuned["confusionMatrix"]["matrix"]
    scored = sum(map(sum, matrix))
    assert scored == tuned["examples"]
    assert tuned["accuracy"] == pytest.approx(
        sum(matrix[i][i] for i in range(len(matrix))) / scored
    )
    assert tuned["macroF1"] == pytest.approx(_macro_f1(tuned["confusionMatrix"]))
    assert tuned["latencyP95Ms"] > 0
    injection = report["probes"]["injection"]
    assert injection["attacks"] == 18 and set(injection["perVariant"]) >= {
        "base64",
        "fake-system",
        "unicode",
    }
    assert tuned["injectionFlipRate"] == injection["injectionFlipRate"]


def _macro_f1(confusion: dict) -> float:  # type: ignore[type-arg]
    """Macro-F1 recomputed from the report's confusion matrix (rows: truth, columns: predicted)."""
    matrix = confusion["matrix"]
    scores = []
    for i in range(len(matrix)):
        true_positive = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(scores) / len(scores)


def test_tampered_file_fails_verification(job_manifest, s3_env, s3_bucket):
    manifest = job_manifest("tamper", output={"uri": f"s3://{s3_bucket}/adapters"})
    assert sectune("run", str(manifest)).returncode == 0
    pointer, _ = _published(s3_bucket, "tamper")
    version = f"s3://{s3_bucket}/adapters/tamper/versions/{pointer['version']}"
    storage.write_bytes(f"{version}/adapter/adapter_config.json", b"{}")
    with pytest.raises(artifacts.IntegrityError, match=r"adapter/adapter_config\.json"):
        artifacts.verify(version, pointer["sha256"])


def test_two_process_ddp_run(job_manifest, s3_env, s3_bucket):
    """Two processes in one pod, as the operator starts one per GPU, with the metrics port
    set: the pod's first process serves the metrics (the second does not try to bind the same
    port), and they show the run's steps while it trains."""
    manifest = job_manifest("ddp", output={"uri": f"s3://{s3_bucket}/adapters"})
    port = free_port()
    # torchrun sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_*; accelerate uses gloo on CPU.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    process = subprocess.Popen(
        [*launcher, "-m", "sectune.cli", "run", str(manifest), "--metrics-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    scraped: list[str] = []

    def scrape() -> None:
        while process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                scraped.append(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text)
            time.sleep(0.2)

    watcher = threading.Thread(target=scrape, daemon=True)
    watcher.start()
    _, stderr = process.communicate(timeout=600)
    watcher.join(timeout=5)
    assert process.returncode == 0, stderr[-3000:]
    assert "address already in use" not in stderr.lower()
    report = _report(f"s3://{s3_bucket}/adapters", "ddp")
    assert report["training"]["worldSize"] == 2
    # 36 training examples, 4 per process per step, 2 processes, 2 epochs -> 5 steps per epoch.
    assert report["training"]["steps"] == 10
    assert any("sectune_train_total_steps 10.0" in text for text in scraped), scraped[-1:]
    assert any("sectune_train_step 10.0" in text for text in scraped), scraped[-1:]
    # not on a terminal: plain progress lines, the first step and the last
    assert "training: 1/10, loss" in stderr and "training: 10/10" in stderr


def _deepspeed_launcher(stage: int, processes: int, port: int) -> list[str]:
    """The launcher the operator renders for a DeepSpeed job, made local: this machine is node
    0 and the rendezvous is on loopback."""
    from sectune_operator.api import FineTuneJobSpec
    from sectune_operator.builders.finetunejob import build_job
    from sectune_operator.settings import Settings

    spec = FineTuneJobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///models/m"},
            "dataset": {"train": "file:///data/train.jsonl"},
            "task": {"type": "classification", "labels": ["a", "b"]},
            "resources": {
                "gpus": processes,
                "distributed": {"strategy": "deepspeed", "zeroStage": stage},
            },
        }
    )
    command = build_job("ds", spec, Settings())["spec"]["template"]["spec"]["containers"][0][
        "command"
    ]
    local = {"$(JOB_COMPLETION_INDEX)": "0", "ds-train-0.ds-train": "127.0.0.1", "29500": str(port)}
    launcher = [local.get(arg, arg) for arg in command[: command.index("-m")]]
    assert launcher[:2] == ["accelerate", "launch"]
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher[2:]]


@pytest.mark.parametrize(("stage", "offload"), [(2, "none"), (3, "cpu")])
def test_deepspeed_zero_runs_through_the_rendered_launcher(
    job_manifest, s3_env, s3_bucket, stage, offload
):
    """Two processes on DeepSpeed's CPU accelerator: ZeRO-2, and ZeRO-3 with weights built
    sharded, optimizer state offloaded, evaluation on every rank and weights gathered to save."""
    name = f"zero{stage}"
    manifest = job_manifest(
        name,
        output={"uri": f"s3://{s3_bucket}/adapters"},
        hyperparameters={"gradientAccumulation": 2},
        resources={
            "gpus": 0,
            "distributed": {"strategy": "deepspeed", "zeroStage": stage, "offload": offload},
        },
    )
    result = subprocess.run(
        [*_deepspeed_launcher(stage, 2, free_port()), "-m", "sectune.cli", "run", str(manifest)],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ.copy(),
    )

    assert result.returncode == 0, result.stderr[-3000:]
    pointer, manifest_doc = _published(s3_bucket, name)
    assert manifest_doc["config"]["resources"]["distributed"]["zeroStage"] == stage
    report = _report(f"s3://{s3_bucket}/adapters", name)
    assert report["training"]["distributed"] == {
        "strategy": "deepspeed",
        "zeroStage": stage,
        "offload": offload,
        "processes": 2,
    }
    # 36 examples, 4 per micro-batch, 2 micro-batches per step, 2 processes, 2 epochs.
    assert report["training"]["steps"] == 6
    assert set(report["models"]) == {"base", "fewShot", "tuned", "tfidf"}
    # The published adapter holds whole trained weights (gathered from the shards at ZeRO-3).
    from safetensors.torch import load_file

    version = f"s3://{s3_bucket}/adapters/{name}/versions/{pointer['version']}"
    local = storage.download_dir(f"{version}/adapter", manifest.parent / f"{name}-adapter")
    weights = load_file(str(local / "adapter_model.safetensors"))
    lora_b = [w for key, w in weights.items() if "lora_B" in key]
    assert lora_b and all(w.numel() > 0 for w in lora_b)
    assert any(float(w.abs().sum()) > 0 for w in lora_b)  # trained away from its zero init
    # Only rank 0 published: one version, one manifest.
    files = list(storage.list_files(f"s3://{s3_bucket}/adapters/{name}/versions"))
    assert len([f for f in files if f.endswith("manifest.json")]) == 1


def test_preempted_run_resumes_from_its_checkpoint(job_manifest, s3_env, s3_bucket):
    prefix = f"s3://{s3_bucket}/adapters"
    manifest = job_manifest(
        "resume",
        rows=400,
        output={"uri": prefix},
        hyperparameters={"batchSize": 1, "epochs": 2, "checkpointEverySteps": 20},
    )
    total_steps = 600  # 300 training examples x 2 epochs, batch 1
    process = subprocess.Popen(
        [sys.executable, "-m", "sectune.cli", "run", str(manifest)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    latest = f"{prefix}/resume/checkpoints/latest.json"
    deadline = time.monotonic() + 300
    while not storage.exists(latest):
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # what the kubelet sends on preemption
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    stopped_at = json.loads(storage.read_bytes(latest))["step"]
    assert 0 < stopped_at < total_steps
    assert artifacts.current(f"{prefix}/resume") is None  # nothing published by the stopped run

    result = sectune("run", str(manifest))

    assert result.returncode == 0, result.stderr[-3000:]
    pointer, _ = _published(s3_bucket, "resume")
    report = _report(prefix, "resume")
    assert report["training"]["resumedFrom"] == stopped_at
    assert report["training"]["steps"] == total_steps
    log = (
        storage.read_bytes(f"{prefix}/resume/versions/{pointer['version']}/training-log.jsonl")
        .decode()
        .splitlines()
    )
    assert json.loads(log[0])["step"] == stopped_at + 1
    assert json.loads(log[-1])["step"] == total_steps

    # The same job name with other settings never resumes the earlier run's checkpoint.
    changed = job_manifest(
        "resume",
        rows=400,
        output={"uri": prefix},
        hyperparameters={"batchSize": 1, "epochs": 1, "checkpointEverySteps": 20},
    )
    result = sectune("run", str(changed))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(prefix, "resume")
    assert report["training"]["resumedFrom"] is None
    assert report["training"]["steps"] == total_steps // 2


def test_failed_upload_keeps_the_previous_adapter(job_manifest, s3_env, s3_bucket, monkeypatch):
    from sectune import runner

    prefix = f"s3://{s3_bucket}/adapters"
    manifest = job_manifest("keep", output={"uri": prefix})
    assert sectune("run", str(manifest)).returncode == 0
    good_pointer, _ = _published(s3_bucket, "keep")

    real_write = storage.write_bytes

    def failing_write(uri, data):  # the store fails halfway through the new version
        if "adapter_model.safetensors" in str(uri if isinstance(uri, str) else uri.key):
            raise storage.StorageError(f"could not write {uri}: ServiceUnavailable")
        return real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    job = load_manifest(manifest)
    with pytest.raises(storage.StorageError):
        runner.run_job(job.name, job.spec)

    pointer, _ = _published(s3_bucket, "keep")
    assert pointer == good_pointer
    versions = {name.split("/")[0] for name in storage.list_files(f"{prefix}/keep/versions")}
    assert len(versions) == 2  # the failed version exists, but without a manifest nobody reads it
    failed = (versions - {good_pointer["version"]}).pop()
    assert not storage.exists(f"{prefix}/keep/versions/{failed}/manifest.json")


@pytest.mark.parametrize("method", ["full", "continued-pretraining"])
def test_full_and_continued_pretraining(job_manifest, s3_env, s3_bucket, method, tiny_model_dir):
    spec: dict = {"method": {"type": method}, "output": {"uri": f"s3://{s3_bucket}/adapters"}}
    if method == "continued-pretraining":
        spec |= {
            "task": {"type": "generation", "labels": []},
            "dataset": {"format": "completion"},
            "hyperparameters": {"packing": True, "learningRate": 0.001},
        }
    manifest = job_manifest(f"tiny-{method}", **spec)

    result = sectune("run", str(manifest))

    assert result.returncode == 0, result.stderr[-3000:]
    _, manifest_doc = _published(s3_bucket, f"tiny-{method}")
    assert "adapter/model.safetensors" in manifest_doc["files"]  # every weight, not an adapter
    # Every weight trained: the stored model loads and differs from the base it started from.
    from safetensors.torch import load, load_file

    pointer, _ = _published(s3_bucket, f"tiny-{method}")
    version = f"s3://{s3_bucket}/adapters/tiny-{method}/versions/{pointer['version']}"
    tuned = load(storage.read_bytes(f"{version}/adapter/model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    shared = set(tuned) & set(base)
    assert shared and all(tuned[k].shape == base[k].shape for k in shared)
    changed = [k for k in shared if not tuned[k].float().equal(base[k].float())]
    assert len(changed) > len(shared) // 2, f"{len(changed)} of {len(shared)} tensors trained"
    report = _report(f"s3://{s3_bucket}/adapters", f"tiny-{method}")
    if method == "continued-pretraining":
        # Causal LM on raw text: the held-out loss is the measure, and it went down.
        assert (
            report["models"]["tuned"]["validationLoss"] < report["models"]["base"]["validationLoss"]
        )


def test_failed_gates_fail_the_run_naming_the_gate(job_manifest, s3_env, s3_bucket):
    prefix = f"s3://{s3_bucket}/adapters"
    manifest = job_manifest(
        "gated", output={"uri": prefix},
        evaluation={"gates": [{"metric": "accuracy", "min": 0.0}, {"metric": "latencyP95Ms", "max": 0.001}]},
    )  # fmt: skip

    result = sectune("run", str(manifest))

    assert result.returncode == 3, result.stderr[-3000:]
    assert "gates failed: latencyP95Ms<=0.001" in result.stderr
    assert artifacts.current(f"{prefix}/gated") is None  # not promotable: current.json never moved
    [version] = {n.split("/")[0] for n in storage.list_files(f"{prefix}/gated/versions")}
    manifest_doc = artifacts.verify(f"{prefix}/gated/versions/{version}").as_dict()
    assert manifest_doc["gatesPassed"] is False
    assert [g["passed"] for g in manifest_doc["gates"]] == [True, False]


def test_evaluate_a_stored_adapter_matches_training_and_checks_gates(
    job_manifest, s3_env, s3_bucket, tmp_path
):
    from support.jobs import write_dataset

    validation = write_dataset(tmp_path / "held-out.jsonl", 16, seed=5)
    prefix = f"s3://{s3_bucket}/adapters"
    manifest = job_manifest(
        "evaluated", output={"uri": prefix}, dataset={"validation": f"file://{validation}"}
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    assert sectune("run", str(manifest), env=env).returncode == 0
    pointer = artifacts.current(f"{prefix}/evaluated")
    training = _report(prefix, "evaluated")

    out = tmp_path / "evaluation"
    evaluate = ["evaluate", "--adapter", f"{prefix}/evaluated", "--data", f"file://{validation}"]
    result = sectune(*evaluate, "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Neither leaves its scratch (checkpoints, staged artifacts, the fetched adapter) behind.
    assert not list(scratch.glob("sectune-*"))
    report = json.loads((out / "report.json").read_text())
    assert report["adapter"]["sha256"] == pointer["sha256"]
    # The same adapter on the same held-out rows gives the training-time numbers.
    assert report["models"]["tuned"]["accuracy"] == training["models"]["tuned"]["accuracy"]
    assert report["models"]["tuned"]["macroF1"] == pytest.approx(
        training["models"]["tuned"]["macroF1"]
    )
    # TF-IDF is re-fit on the job's training data and scored on the same rows: on the job's
    # own held-out rows it gives the training-time number.
    assert report["models"]["tfidf"]["macroF1"] == pytest.approx(
        training["models"]["tfidf"]["macroF1"]
    )
    assert report["baselinesFrom"].startswith("these rows: tfidf (re-measured now)")
    assert "on these rows: " in report["worthIt"] and "tfidf" in report["worthIt"]
    assert "Verdict: macroF1" in result.stderr
    assert report["hardware"] and report["numerics"].startswith("cpu, float32 weights")

    # The base model too, when asked: same rows, adapter switched off.
    both = sectune(*evaluate, "--baselines", "tfidf,base,fewShot", "--out", str(tmp_path / "b"))
    assert both.returncode == 0, both.stderr[-3000:]
    rebased = json.loads((tmp_path / "b" / "report.json").read_text())
    assert {"tfidf", "base", "fewShot"} <= set(rebased["models"])
    assert rebased["models"]["base"]["accuracy"] == pytest.approx(
        training["models"]["base"]["accuracy"]
    )
    assert "training time" not in rebased["baselinesFrom"]
    refused = sectune(*evaluate, "--baselines", "tfidf,vibes", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--baselines vibes" in refused.stderr

    # Training data changed since: TF-IDF is not re-fit on other data, and the report says so.
    train = Path(load_manifest(manifest).spec.dataset.train.removeprefix("file://"))
    write_dataset(train, 48, seed=9)
    changed = sectune(*evaluate, "--out", str(tmp_path / "c"))
    assert changed.returncode == 0, changed.stderr[-3000:]
    stale = json.loads((tmp_path / "c" / "report.json").read_text())
    assert "tfidf" not in stale["models"]
    assert "changed since training" in stale["baselinesFrom"]

    gates = tmp_path / "gates.yaml"
    gates.write_text("- metric: accuracy\n  min: 0.0\n- metric: injectionFlipRate\n  max: -1\n")
    result = sectune(*evaluate, "--gates", str(gates), "--out", str(out))
    assert result.returncode == 3
    assert "gates failed: injectionFlipRate<=-1" in result.stderr


def test_classifier_head_trains_publishes_and_evaluates_like_the_lm_head(
    job_manifest, s3_env, s3_bucket, tmp_path
):
    """task.head: classifier trains on the label set's cross-entropy; its adapter is a plain
    LoRA adapter that `sectune evaluate` scores to the same numbers as training did."""
    prefix = f"s3://{s3_bucket}/adapters"
    manifest = job_manifest("head", output={"uri": prefix}, task={"head": "classifier"})
    result = sectune("run", str(manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    training = _report(prefix, "head")
    assert training["training"]["objective"].startswith("label-set cross-entropy")
    _, manifest_doc = _published(s3_bucket, "head")
    assert manifest_doc["config"]["task"]["head"] == "classifier"

    validation = tmp_path / "rows.jsonl"
    validation.write_text(Path(tmp_path / "head-train.jsonl").read_text())
    out = tmp_path / "evaluation"
    evaluate = ["evaluate", "--adapter", f"{prefix}/head", "--data", f"file://{validation}"]
    result = sectune(*evaluate, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    tuned = report["models"]["tuned"]
    assert tuned["macroF1"] == pytest.approx(_macro_f1(tuned["confusionMatrix"]))

    # Labels that start with one token cannot share the head: refused before any training.
    clash = job_manifest("clash", output={"uri": prefix},
                         task={"head": "classifier", "labels": ["benign", "malicious", "benignant"]})  # fmt: skip
    refused = sectune("run", str(clash))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "task.head: classifier: labels 'benign' and 'benignant'" in refused.stderr
    assert "Training" not in refused.stderr


def test_extraction_job_reports_schema_and_field_metrics(job_manifest, s3_env, s3_bucket, tmp_path):
    data = write_login_lines(tmp_path / "logs.jsonl", 24)
    schema = LOGIN_SCHEMA
    manifest = job_manifest(
        "extract",
        output={"uri": f"s3://{s3_bucket}/adapters"},
        dataset={
            "train": f"file://{data}",
            "format": "instruction",
            "fields": {"instruction": "text", "output": "fields"},
        },
        task={"type": "extraction", "labels": [], "outputSchema": schema},
        evaluation={"gates": [{"metric": "schemaCompliance", "min": 0.0}]},
    )
    result = sectune("run", str(manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(f"s3://{s3_bucket}/adapters", "extract")
    tuned = report["models"]["tuned"]
    assert set(tuned) >= {
        "formatCompliance",
        "schemaCompliance",
        "fieldF1",
        "exactMatch",
        "validationLoss",
    }
    assert tuned["examples"] == 6 and report["probes"]["samples"]
    # The same rows held to the schema while decoding, as the server answers: every one is a
    # document of the schema, whatever the tiny model learned.
    held = tuned["constrained"]
    assert held["examples"] == 6
    assert held["schemaCompliance"] == 1.0 and held["formatCompliance"] == 1.0


@pytest.mark.parametrize(
    ("kind", "canaries", "hyperparameters", "memorized"),
    [
        ("normal", {"count": 4, "repeats": 1}, {"epochs": 2}, False),
        # Built to memorize: each canary 16 times per epoch, 12 epochs.
        ("memorizing", {"count": 4, "repeats": 16}, {"epochs": 12}, True),
    ],
)
def test_memorization_probe_fails_a_run_that_memorized_its_canaries(
    job_manifest, s3_env, s3_bucket, kind, canaries, hyperparameters, memorized
):
    """Canaries are planted where training fits them (here: as generation targets) and ranked
    against 512 random codes; a realistic gate (5 bits, where chance averages 1.44) passes a
    normal run and fails one that memorized."""
    name = f"canaries-{kind}"
    manifest = job_manifest(
        name,
        rows=24,
        output={"uri": f"s3://{s3_bucket}/adapters"},
        method={"type": "lora", "r": 8, "alpha": 16},
        task={"type": "generation", "labels": []},
        dataset={"format": "completion", "canaries": canaries},
        hyperparameters={"learningRate": 0.01, **hyperparameters},
        evaluation={"gates": [{"metric": "canaryExposure", "max": 5}]},
    )
    result = sectune("run", str(manifest))

    assert result.returncode == (3 if memorized else 0), result.stderr[-3000:]
    pointer = artifacts.current(f"s3://{s3_bucket}/adapters/{name}")
    assert (pointer is None) == memorized  # a memorizing run is never made current
    [version] = {
        n.split("/")[0] for n in storage.list_files(f"s3://{s3_bucket}/adapters/{name}/versions")
    }
    report = json.loads(
        storage.read_bytes(f"s3://{s3_bucket}/adapters/{name}/versions/{version}/report.json")
    )
    memorization = report["probes"]["memorization"]
    assert memorization["candidates"] == 512 and len(memorization["ranks"]) == 4
    assert memorization["maxMeasurable"] == pytest.approx(9.0028, abs=1e-3)
    assert memorization["chance"] == pytest.approx(1.4427, abs=1e-3)
    assert memorization["measures"].startswith("the canary as the answer")
    assert report["models"]["tuned"]["canaryExposure"] == memorization["canaryExposure"]
    assert (memorization["canaryExposure"] > 5) == memorized
    assert report["data"]["canaries"] == canaries
    assert memorization["regurgitation"]["prompts"] == 4
    if memorized:
        assert report["verdict"] == "gates failed: canaryExposure<=5"


def test_classification_canaries_measure_the_label_they_were_planted_with(
    job_manifest, s3_env, s3_bucket
):
    """In classification the loss sees only the label: each canary gets a label of its own, and
    the probe ranks that label's probability given the planted input against control inputs."""
    manifest = job_manifest(
        "canaries-cls",
        rows=24,
        output={"uri": f"s3://{s3_bucket}/adapters"},
        dataset={"canaries": {"count": 3, "repeats": 2}},
    )
    result = sectune("run", str(manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    report = _report(f"s3://{s3_bucket}/adapters", "canaries-cls")
    memorization = report["probes"]["memorization"]
    assert memorization["measures"].startswith("the planted label given the planted input")
    assert len(memorization["ranks"]) == 3
    assert 0 <= memorization["canaryExposure"] <= memorization["maxExposure"]
    assert memorization["maxExposure"] <= memorization["maxMeasurable"] + 1e-9


def test_a_run_is_compared_with_the_previous_version_it_would_replace(
    trained, tiny_model_dir, tmp_path
):
    """evaluation.previousVersion: the stored version (verified, same base) is scored on the
    same held-out data; the report puts it next to the tuned model and a gate can demand "no
    worse than what is served" — on the held-out set, and on the newest analysts' verdicts
    (dataset.feedback.holdOut), which it never trained on. A digest that does not match is
    refused as bad input."""
    from sectune.yamlio import dump_yaml
    from support.jobs import tiny_job, write_dataset

    train = write_dataset(tmp_path / "train.jsonl", 48, seed=5)
    verdicts = _stored_verdicts(write_dataset(tmp_path / "judged.jsonl", 20, seed=9), tmp_path)
    previous = {"uri": trained.triage_v1.uri, "sha256": trained.triage_v1.sha256}
    evaluation = {
        "probeExamples": 4,
        "previousVersion": previous,
        "gates": [
            {"metric": "accuracy", "overBaseline": "previous", "min": -1.0},
            {"metric": "accuracy", "basis": "verdicts", "overBaseline": "previous", "min": -1.0},
        ],
    }
    dataset = {"feedback": {"uri": f"file://{verdicts}", "holdOut": 0.5}}
    output = {"uri": f"s3://{trained.bucket}/compared"}
    manifest = tmp_path / "job.yaml"

    def job() -> str:
        return dump_yaml(
            tiny_job(
                "triage", tiny_model_dir, train, evaluation=evaluation, output=output,
                dataset=dataset,
            )
        )  # fmt: skip

    manifest.write_text(job())
    result = sectune("run", str(manifest), env=trained.env)
    assert result.returncode == 0, result.stderr[-3000:]
    env_before = {k: os.environ.get(k) for k in trained.env}
    os.environ.update(trained.env)
    try:
        pointer = artifacts.current(f"s3://{trained.bucket}/compared/triage")
        assert pointer is not None
        version = f"s3://{trained.bucket}/compared/triage/versions/{pointer['version']}"
        report = json.loads(storage.read_bytes(f"{version}/report.json"))
    finally:
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert report["previousVersion"]["uri"] == trained.triage_v1.uri
    assert report["previousVersion"]["sha256"] == trained.triage_v1.sha256
    # the served version was scored on the same held-out rows as the new one
    previous = report["models"]["previous"]
    assert previous["examples"] == report["models"]["tuned"]["examples"]
    matrix = previous["confusionMatrix"]["matrix"]
    assert previous["accuracy"] == pytest.approx(
        sum(matrix[i][i] for i in range(len(matrix))) / previous["examples"]
    )
    gate, on_verdicts = report["gates"]
    assert gate["name"].startswith("accuracy") and gate["passed"]
    expected = report["models"]["tuned"]["accuracy"] - report["models"]["previous"]["accuracy"]
    assert gate["value"] == pytest.approx(expected)
    assert "accuracy" in report["deltas"]["previous"]
    # The newest 10 of the 20 verdicts were held out: both versions scored on them, and the
    # gate read them; the other 10 joined training.
    judged = report["verdicts"]
    assert judged["rows"] == 10
    assert judged["tuned"]["examples"] == judged["previous"]["examples"] == 10
    assert on_verdicts["name"] == "accuracy-over-previous@verdicts>=-1"
    assert on_verdicts["value"] == pytest.approx(
        judged["tuned"]["accuracy"] - judged["previous"]["accuracy"]
    )
    fed = report["data"]["sources"]["feedback"]
    assert (fed["used"], fed["heldOut"]) == (10, 10)

    evaluation["previousVersion"] = {"uri": trained.triage_v1.uri, "sha256": "0" * 64}
    manifest.write_text(job())
    refused = sectune("run", str(manifest), env=trained.env)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "manifest.json" in refused.stderr and "0" * 16 in refused.stderr


def _stored_verdicts(rows: Path, tmp_path: Path) -> Path:
    """Analysts' verdicts on `rows` as a server stores them, one a minute apart."""
    from sectune.config import SanitizeSpec
    from sectune.data.sanitize import Sanitizer
    from sectune.serving.feedback import Judgement, Prediction, VerdictRequest, build_record

    folder = tmp_path / "verdicts" / "triage"
    folder.mkdir(parents=True)
    lines = []
    for i, line in enumerate(rows.read_text().splitlines()):
        row = json.loads(line)
        at = time.time() - 3600 + 60 * i
        prediction = Prediction(
            id=f"pred-{i:024x}", adapter="triage", version="v1", task="classification",
            output="benign", sanitize=SanitizeSpec(), labels=("benign", "malicious"),
            fields={"text": row["text"]}, at=at,
        )  # fmt: skip
        request = VerdictRequest(id=prediction.id, label=row["label"])
        judged = Judgement(prediction, request, row["label"], "soar", at=at + 30)
        lines.append(build_record(judged, Sanitizer(SanitizeSpec())).line())
    (folder / "20261204T000000Z-abcd.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_recall_targets_fit_a_rule_the_served_version_decides_with(job_manifest, tmp_path):
    """task.recallTargets: the evaluation fits a threshold on held-out rows, reports the
    cross-fitted figures next to argmax's, a gate reads them, and `sectune serve` answers with
    the stored rule."""
    from sectune.contract import DecisionRule
    from support.serving import TEXTS, start_server

    out = tmp_path / "out"
    manifest = job_manifest(
        "decided", output={"uri": f"file://{out}"},
        task={"recallTargets": {"malicious": 1.0}},
        evaluation={"probeExamples": 4, "gates": [
            {"metric": "recall", "class": "malicious", "basis": "decision", "min": 0.0}]},
    )  # fmt: skip
    result = sectune("run", str(manifest))
    assert result.returncode == 0, result.stderr[-3000:]
    [report_path] = (out / "decided" / "versions").glob("*/report.json")
    report = json.loads(report_path.read_text())
    decided = report["models"]["tuned"]["decision"]
    assert decided["recallTargets"] == {"malicious": 1.0}
    assert decided["crossFitted"]["examples"] == report["models"]["tuned"]["examples"]
    [gate] = report["gates"]
    assert gate["name"] == "recall[malicious]@decision>=0"
    assert gate["value"] == decided["crossFitted"]["perClass"]["malicious"]["recall"]
    rule = DecisionRule.model_validate(decided["rule"])
    assert rule.order == ["malicious"]
    page = (report_path.parent / "report.html").read_text()
    assert "Recall targets (cross-fitted" in page and "<td>malicious</td>" in page

    server = start_server(tmp_path, ["--adapter", f"decided=file://{out}/decided"], {})
    try:
        labels = ["benign", "malicious"]
        for text in TEXTS:
            answer = server.classify("decided", text).json()
            assert answer["decidedBy"] == "recallTargets"
            probabilities = [answer["probabilities"][label] for label in labels]
            assert answer["label"] == labels[rule.decide(probabilities, labels)]
    finally:
        server.stop()


def test_a_rerun_takes_unchanged_base_scores_from_the_cache(job_manifest, tmp_path):
    """The same manifest twice: the second run does not score the base model again and reports
    the same baseline figures (what changes the key: tests/unit/test_evaluation.py)."""
    out = tmp_path / "out"
    manifest = job_manifest(
        "cached", output={"uri": f"file://{out}"}, evaluation={"probeExamples": 4}
    )
    env = {"SECTUNE_SCORE_CACHE": str(tmp_path / "scores")}
    first = sectune("run", str(manifest), env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "scores unchanged" not in first.stderr
    [stored] = list((tmp_path / "scores").glob("*.json"))
    assert stored.stat().st_mode & 0o777 == 0o600
    second = sectune("run", str(manifest), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Base model scores unchanged since an earlier run: cached" in second.stderr
    reports = sorted(
        (out / "cached" / "versions").glob("*/report.json"), key=lambda p: p.parent.name
    )
    base = [json.loads(r.read_text())["models"]["base"] for r in reports]
    assert len(base) == 2 and base[0] == base[1]
