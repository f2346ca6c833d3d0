"""One job, start to finish: data -> sanitize -> base model -> baseline -> train -> evaluate ->
gates -> artifacts. `sectune run` (laptop) and `sectune train` (pod) both call `run_job`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sectune import __version__, storage
from sectune.config import JobSpec
from sectune.contract import (
    AdapterManifest,
    ExitCode,
    ManifestBaseModel,
    ManifestDataset,
    ResultAdapter,
    ResultDataset,
    ResultGate,
    TrainerResult,
)

# Exit codes the operator's Pod failure policy reads (sectune.contract.ExitCode).
EXIT_OK = ExitCode.OK
EXIT_INFRASTRUCTURE = ExitCode.INFRASTRUCTURE
EXIT_BAD_INPUT = ExitCode.BAD_INPUT
EXIT_GATES_FAILED = ExitCode.GATES_FAILED
EXIT_PREEMPTED = ExitCode.PREEMPTED


class ResourceError(ValueError):
    """The manifest asks for hardware this machine does not have."""


@dataclass
class Outcome:
    job: str
    phase: str
    reason: str
    message: str = ""
    adapter_uri: str | None = None
    adapter_sha256: str | None = None
    adapter_bytes: int | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def result(self) -> TrainerResult:
        """What the operator reads (sectune.contract), from the run's report."""
        tuned = self.report.get("models", {}).get("tuned", {})
        data = self.report.get("data", {})
        return TrainerResult(
            phase=self.phase,
            reason=self.reason,
            message=self.message[:600],
            adapter=ResultAdapter(
                uri=self.adapter_uri, sha256=self.adapter_sha256, size_bytes=self.adapter_bytes
            ),
            metrics={
                k: round(tuned[k], 4)
                for k in ("accuracy", "macroF1", "validationLoss")
                if k in tuned
            },
            gates=[
                ResultGate(name=g["name"], passed=g["passed"], value=g["value"])
                for g in self.report.get("gates", [])
            ],
            dataset=ResultDataset(
                digest=data.get("digest"),
                counts=data.get("counts") or {},
                redactions=data.get("sanitize", {}).get("redactions", {}),
            ),
        )


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def check_resources(spec: JobSpec) -> None:
    import torch

    wanted = spec.resources.gpus * spec.resources.nodes
    available = torch.cuda.device_count()
    if wanted > available:
        raise ResourceError(
            f"spec.resources.gpus: the manifest asks for {wanted} GPU(s) and this machine has "
            f"{available}. Run on CPU with `sectune run --cpu MANIFEST` (sets gpus: 0), or set "
            "spec.resources.gpus: 0 in the manifest."
        )
    if spec.base_model.quantization == "int8" and not torch.cuda.is_available():
        raise ResourceError(
            "spec.baseModel.quantization: int8 needs a GPU; use nf4 (QLoRA) or none on CPU"
        )


def job_prefix(spec: JobSpec, name: str) -> storage.Location:
    return storage.parse_uri(spec.output.uri or "file://./runs").join(name)


def training_fingerprint(spec: JobSpec, dataset_digest: str | None) -> str:
    """What a checkpoint must have been trained with to be resumed: the same spec and data.
    (The output location is left out: it names where checkpoints live, not what they hold.)"""
    import hashlib

    config = spec.model_dump(mode="json", by_alias=True, exclude={"output"})
    body = json.dumps({"spec": config, "data": dataset_digest}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def prompt_length_reference(tokenizer: Any, spec: JobSpec, data: Any) -> dict[str, float] | None:
    """Prompt-length mix of the held-out examples, as served prompts will be measured."""
    from sectune.data.format import PromptFormatter
    from sectune.serving.drift import length_distribution

    formatter = PromptFormatter(tokenizer, spec)
    examples = data.test or data.validation
    return length_distribution([n for n in (len(formatter.prompt_ids(e)) for e in examples) if n])


def run_job(
    name: str,
    spec: JobSpec,
    on_event: Callable[[str, dict[str, Any]], None] = lambda event, data: None,
) -> Outcome:
    """Run the whole job; artifacts are published only if training and evaluation finished.

    `on_event` hears progress: ("stage", {name}), ("step", StepReport fields), ("data", report).
    """
    import torch

    from sectune import artifacts, placement
    from sectune.data.prepare import prepare_data
    from sectune.evaluation.baselines import tfidf_baseline
    from sectune.evaluation.gates import evaluate_gates, gate_verdict
    from sectune.evaluation.report import render_html
    from sectune.evaluation.suite import baselines, evaluate_tuned, score_previous
    from sectune.training import base_model
    from sectune.training.distributed import describe, make_accelerator, zero3
    from sectune.training.train import Checkpoints, train, wrap_with_lora

    started = dt.datetime.now(dt.UTC)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    prefix = job_prefix(spec, name)
    check_resources(spec)
    torch.manual_seed(spec.hyperparameters.seed)

    on_event("stage", {"name": "Preparing data"})
    data = prepare_data(spec)
    on_event("data", data.report)

    on_event("stage", {"name": "Loading base model"})
    numerics = placement.for_training(spec.hyperparameters.precision, spec.method.type)
    # Before the model: at ZeRO-3 it is then built already sharded across the ranks.
    accelerator = make_accelerator(spec, numerics)
    resolved = base_model.resolve(spec.base_model)
    model, tokenizer = base_model.load(
        resolved, spec.base_model, numerics.weights_dtype, str(accelerator.device)
    )
    classification = spec.task.type == "classification"
    use_amp = numerics.autocast is not None
    # At ZeRO-3 a forward pass gathers weights from every rank: all ranks evaluate together.
    collective = zero3(accelerator)
    evaluates = accelerator.is_main_process or collective
    models: dict[str, dict[str, Any]] = {}

    if spec.evaluation.baseline and accelerator.is_main_process and not collective:
        on_event("stage", {"name": "Scoring the base model"})
        models |= baselines(model, tokenizer, data, spec, use_amp)

    on_event("stage", {"name": "Training"})
    workdir = Path(tempfile.mkdtemp(prefix=f"sectune-{name}-"))
    model = wrap_with_lora(model, spec)
    result = train(
        model,
        tokenizer,
        data.train,
        spec,
        accelerator,
        Checkpoints(
            prefix, workdir, training_fingerprint(spec, data.report.get("digest")), accelerator
        ),
        on_step=lambda report: on_event("step", report.__dict__),
    )
    model = result.model
    if spec.evaluation.baseline and collective:
        on_event("stage", {"name": "Scoring the base model"})
        with model.disable_adapter():  # the base, from the same shards (admission: adapters)
            models |= baselines(model, tokenizer, data, spec, use_amp)
    if not evaluates:
        return Outcome(name, "Succeeded", "WorkerDone")

    on_event("stage", {"name": "Evaluating"})
    models["tuned"], probes = evaluate_tuned(model, tokenizer, data, spec, use_amp)
    previous_version = None
    if spec.evaluation.previous_version is not None:
        on_event("stage", {"name": "Scoring the previous version"})
        models["previous"], previous_version = score_previous(
            model, tokenizer, data, spec, use_amp, resolved.digest, workdir
        )
    # At ZeRO-3 the weights are gathered from every rank; only the main process publishes.
    weights = accelerator.get_state_dict(result.prepared) if collective else None
    if not accelerator.is_main_process:
        return Outcome(name, "Succeeded", "WorkerDone")
    if classification:
        models["tfidf"] = tfidf_baseline(
            data.train, data.test, spec.task.labels, spec.hyperparameters.seed
        )
    compared = {k: v for k, v in models.items() if k != "tuned"}
    gate_outcomes = [
        g.as_dict() for g in evaluate_gates(spec.evaluation.gates, models["tuned"], compared)
    ]
    gates_passed, verdict = gate_verdict(gate_outcomes)

    report = {
        "job": name,
        "run": run_id,
        "task": spec.task.type,
        "models": models,
        "deltas": {
            base: {
                m: models["tuned"][m] - models[base][m]
                for m in ("accuracy", "macroF1", "validationLoss")
                if m in models[base] and m in models["tuned"]
            }
            for base in compared
        },
        "probes": probes,
        "previousVersion": previous_version,
        "gates": gate_outcomes,
        "gatesPassed": gates_passed,
        "verdict": verdict,
        "data": data.report,
        "training": {
            "steps": result.steps,
            "worldSize": accelerator.num_processes,
            "distributed": describe(accelerator),
            "numerics": numerics.describe(),
            "resumedFrom": result.resumed_from,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),
            "tokensPerSecond": round(result.tokens / max(result.seconds, 1e-9), 1),
            "truncated": result.truncated,
            "dropped": result.dropped,
            "finalLoss": result.history[-1]["loss"] if result.history else None,
        },
        "hardware": hardware(),
    }

    on_event("stage", {"name": "Publishing artifacts"})
    stage = workdir / "stage"
    (stage / "adapter").mkdir(parents=True)
    model.save_pretrained(stage / "adapter", safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(stage / "adapter")
    (stage / "report.json").write_text(json.dumps(report, indent=2))
    (stage / "report.html").write_text(render_html(report))
    (stage / "data-report.json").write_text(json.dumps(data.report, indent=2))
    (stage / "training-log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in result.history))
    manifest = AdapterManifest(
        job=name,
        run=run_id,
        sectune_version=__version__,
        start_time=started.isoformat(),
        end_time=dt.datetime.now(dt.UTC).isoformat(),
        base_model=ManifestBaseModel(
            uri=spec.base_model.uri,
            sha256=resolved.digest,
            quantization=spec.base_model.quantization,
        ),
        method=spec.method.type,
        config=spec.model_dump(mode="json", by_alias=True),
        dataset=ManifestDataset(
            digest=data.report.get("digest"),
            counts=data.report.get("counts"),
            sources=data.report.get("sources"),
        ),
        redactions=data.report.get("sanitize", {}).get("redactions", {}),
        canaries={"count": len(data.canaries)},
        metrics=models["tuned"],
        gates=gate_outcomes,
        gates_passed=gates_passed,
        # What serving compares its inputs with (sectune.serving.drift).
        reference={"promptTokens": prompt_length_reference(tokenizer, spec, data)},
    )
    published = artifacts.publish(stage, prefix, run_id, manifest, make_current=gates_passed)
    phase, reason = ("Succeeded", "GatesPassed") if gates_passed else ("Failed", "GatesFailed")
    return Outcome(
        name,
        phase,
        reason,
        verdict,
        adapter_uri=published.uri,
        adapter_sha256=published.manifest_sha256,
        adapter_bytes=published.adapter_bytes,
        report=report,
    )
