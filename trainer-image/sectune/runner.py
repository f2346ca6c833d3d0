"""One job, start to finish: data -> sanitize -> base model -> baseline -> train -> evaluate ->
gates -> artifacts. `sectune run` (laptop) and `sectune train` (pod) both call `run_job`.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune import __version__, placement, storage
from sectune.config import JobSpec
from sectune.contract import (
    RESULT_METRICS,
    AdapterManifest,
    DataReport,
    GateOutcome,
    ManifestBaseModel,
    ManifestDataset,
    ResultAdapter,
    ResultDataset,
    ResultGate,
    RunReport,
    TrainerResult,
)
from sectune.data.audit import DataAudit


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
    report: RunReport | None = None
    """None on a non-main process of a distributed run, and when the run failed early."""

    def result(self) -> TrainerResult:
        """What the operator reads (sectune.contract), from the run's report."""
        report = self.report or RunReport()
        tuned, data = report.tuned, report.data or DataReport()
        return TrainerResult(
            phase=self.phase,
            reason=self.reason,
            message=self.message[:600],
            adapter=ResultAdapter(
                uri=self.adapter_uri, sha256=self.adapter_sha256, size_bytes=self.adapter_bytes
            ),
            metrics={k: round(tuned[k], 4) for k in RESULT_METRICS if k in tuned},
            gates=[ResultGate(name=g.name, passed=g.passed, value=g.value) for g in report.gates],
            dataset=ResultDataset(
                digest=data.digest,
                counts=data.counts,
                skipped=data.skipped_rows,
                redactions=data.redactions,
                quality=DataAudit.model_validate(data.audit).summary() if data.audit else None,
            ),
        )


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


def truncation_coverage(tokenizer: Any, spec: JobSpec, data: Any) -> Any:
    """Training rows cut by maxSeqLength, and how much of each (sectune.data.audit)."""
    from sectune.data.audit import truncation
    from sectune.data.format import PromptFormatter

    formatter = PromptFormatter(tokenizer, spec)
    rows = [e for e in data.train if not e.canary]
    classifier = spec.task.type == "classification" and spec.task.head == "classifier"
    return truncation(
        rows,
        [len(formatter.prompt_ids(e)) for e in rows],
        [0 if classifier else len(formatter.target_ids(e)) for e in rows],
        formatter.max_length,
        labelled=spec.task.type == "classification",
    )


def prompt_length_reference(tokenizer: Any, spec: JobSpec, data: Any) -> dict[str, float] | None:
    """Prompt-length mix of the held-out examples, as served prompts will be measured."""
    from sectune.data.format import PromptFormatter
    from sectune.serving.drift import length_distribution

    formatter = PromptFormatter(tokenizer, spec)
    examples = data.test or data.validation
    return length_distribution([n for n in (len(formatter.prompt_ids(e)) for e in examples) if n])


@dataclass
class _Loaded:
    """The base model ready to train, and how this process computes."""

    model: Any
    tokenizer: Any
    resolved: Any
    """training.base_model.ResolvedModel: where the weights are and their digest."""
    numerics: Any
    """sectune.placement.Numerics"""
    accelerator: Any

    @property
    def autocast(self) -> bool:
        return self.numerics.autocast is not None

    @property
    def collective(self) -> bool:
        """At ZeRO-3 a forward pass gathers weights from every rank: all ranks evaluate."""
        from sectune.training.distributed import zero3

        return bool(zero3(self.accelerator))


def run_job(
    name: str,
    spec: JobSpec,
    on_event: Callable[[str, Any], None] = lambda event, data: None,
) -> Outcome:
    """Run the whole job; artifacts are published only if training and evaluation finished.

        prepare data -> load base model -> baselines -> train -> evaluate -> gates -> publish

    `on_event` hears progress: ("stage", {name}), ("step", TrainingProgress), ("data", report).
    """
    import torch

    from sectune.data.prepare import prepare_data
    from sectune.evaluation.gates import evaluate_gates
    from sectune.training.objectives import objective_for

    started = dt.datetime.now(dt.UTC)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    check_resources(spec)
    torch.manual_seed(spec.hyperparameters.seed)
    # Scratch only (checkpoint staging, the artifacts before upload, the previous version):
    # removed when the job ends, whatever the outcome.
    with tempfile.TemporaryDirectory(
        prefix=f"sectune-{name}-", ignore_cleanup_errors=True
    ) as scratch:
        workdir = Path(scratch)

        on_event("stage", {"name": "Preparing data"})
        data = prepare_data(spec)
        on_event("data", data.report)

        on_event("stage", {"name": "Loading base model"})
        loaded = _load_base_model(spec)
        if data.audit is not None:  # how much of each row maxSeqLength leaves out
            data.audit.coverage.truncation = truncation_coverage(loaded.tokenizer, spec, data)
            data.report.audit = data.audit.as_dict()
        # A head the labels cannot use (two start with one token) fails now, not after baselines.
        objective_for(loaded.tokenizer, spec, data.train)
        main = loaded.accelerator.is_main_process
        models: dict[str, dict[str, Any]] = {}
        if spec.evaluation.baseline and main and not loaded.collective:
            on_event("stage", {"name": "Scoring the base model"})
            models |= _score_base(loaded, data, spec, on_event)

        on_event("stage", {"name": "Training"})
        result = _train(name, spec, loaded, data, workdir, on_event)
        if spec.evaluation.baseline and loaded.collective:
            on_event("stage", {"name": "Scoring the base model"})
            with loaded.model.disable_adapter():  # the base, from the same shards (adapters only)
                models |= _score_base(loaded, data, spec, on_event)
        if not (main or loaded.collective):
            return Outcome(name, "Succeeded", "WorkerDone")

        on_event("stage", {"name": "Evaluating"})
        verdicts: dict[str, dict[str, Any]] = {}
        probes, previous_version = _evaluate(
            spec, loaded, data, workdir, models, verdicts, on_event
        )
        # At ZeRO-3 the weights are gathered from every rank; only the main process publishes.
        weights = loaded.accelerator.get_state_dict(result.prepared) if loaded.collective else None
        if not main:
            return Outcome(name, "Succeeded", "WorkerDone")

        compared = {k: v for k, v in models.items() if k != "tuned"}
        outcomes = evaluate_gates(spec.evaluation.gates, models["tuned"], compared, verdicts)
        report = build_report(
            name, run_id, spec, data, loaded, result, models, probes, previous_version, outcomes
        )
        if verdicts:
            report.verdicts = {"rows": len(data.verdicts), **verdicts}

        on_event("stage", {"name": "Publishing artifacts"})
        gates_passed, verdict = report.gates_passed, report.verdict
        manifest = build_manifest(
            name, run_id, started, spec, data, loaded, models["tuned"], outcomes, gates_passed
        )
        published = _publish(
            spec, name, run_id, workdir, loaded, weights, report, data, result, manifest
        )
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


def _load_base_model(spec: JobSpec) -> _Loaded:
    from sectune.training import base_model
    from sectune.training.distributed import make_accelerator

    numerics = placement.for_training(spec.hyperparameters.precision, spec.method.type)
    # Before the model: at ZeRO-3 it is then built already sharded across the ranks.
    accelerator = make_accelerator(spec, numerics)
    resolved = base_model.resolve(spec.base_model)
    model, tokenizer = base_model.load(
        resolved, spec.base_model, numerics.weights_dtype, str(accelerator.device)
    )
    return _Loaded(model, tokenizer, resolved, numerics, accelerator)


def _score_base(
    loaded: _Loaded, data: Any, spec: JobSpec, on_event: Callable[[str, Any], None]
) -> dict[str, dict[str, Any]]:
    """The base model's scores (zero-shot, few-shot), from the score cache when nothing they
    depend on changed since a run computed them (sectune.evaluation.score_cache)."""
    from sectune.evaluation import score_cache
    from sectune.evaluation.suite import BASELINE_NAMES, baselines

    settings = spec.model_dump(
        mode="json", by_alias=True, include={"task", "hyperparameters", "evaluation"}
    )
    cache_key = score_cache.key(
        loaded.resolved.digest, loaded.numerics.describe(), settings, data, BASELINE_NAMES
    )
    # At ZeRO-3 every rank scores together: a rank reading the cache while another scores
    # would leave it waiting on a collective, so there the base model is always scored.
    cached = None if loaded.collective else score_cache.load(cache_key)
    if cached is not None:
        on_event("stage", {"name": "Base model scores unchanged since an earlier run: cached"})
        return cached
    scores = baselines(loaded.model, loaded.tokenizer, data, spec, loaded.autocast)
    if not loaded.collective:
        score_cache.store(cache_key, scores)
    return scores


def _train(
    name: str,
    spec: JobSpec,
    loaded: _Loaded,
    data: Any,
    workdir: Path,
    on_event: Callable[[str, Any], None],
) -> Any:
    """LoRA (or the whole model) trained on the prepared examples; `loaded.model` becomes the
    trained model."""
    from sectune.training.train import Checkpoints, train, wrap_with_lora

    checkpoints = Checkpoints(
        job_prefix(spec, name),
        workdir,
        training_fingerprint(spec, data.report.digest),
        loaded.accelerator,
    )
    result = train(
        wrap_with_lora(loaded.model, spec),
        loaded.tokenizer,
        data.train,
        spec,
        loaded.accelerator,
        checkpoints,
        on_step=lambda progress: on_event("step", progress),
    )
    loaded.model = result.model
    return result


def _evaluate(
    spec: JobSpec,
    loaded: _Loaded,
    data: Any,
    workdir: Path,
    models: dict[str, dict[str, Any]],
    verdicts: dict[str, dict[str, Any]],
    on_event: Callable[[str, dict[str, Any]], None],
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """The tuned model's metrics and probes, the previous version's and TF-IDF's on the same
    held-out rows (into `models`), and the tuned and previous on the held-out analysts'
    verdicts (into `verdicts`); returns the probes and where the previous version was."""
    from sectune.evaluation.baselines import tfidf_baseline
    from sectune.evaluation.suite import classify, evaluate_tuned, score_previous

    model, tokenizer = loaded.model, loaded.tokenizer
    models["tuned"], probes = evaluate_tuned(model, tokenizer, data, spec, loaded.autocast)
    if data.verdicts and spec.task.type == "classification":
        verdicts["tuned"] = classify(model, tokenizer, data.verdicts, spec, loaded.autocast)
    previous_version = None
    if spec.evaluation.previous_version is not None:
        on_event("stage", {"name": "Scoring the previous version"})
        models["previous"], on_verdicts, previous_version = score_previous(
            model, tokenizer, data, spec, loaded.autocast, loaded.resolved.digest, workdir
        )
        if on_verdicts is not None:
            verdicts["previous"] = on_verdicts
    if spec.task.type == "classification" and loaded.accelerator.is_main_process:
        models["tfidf"] = tfidf_baseline(
            data.train, data.test, spec.task.labels, spec.hyperparameters.seed, data.leaked_ids()
        )
    return probes, previous_version


def build_report(
    name: str,
    run_id: str,
    spec: JobSpec,
    data: Any,
    loaded: _Loaded,
    result: Any,
    models: dict[str, dict[str, Any]],
    probes: dict[str, Any],
    previous_version: dict[str, str] | None,
    gates: list[GateOutcome],
) -> RunReport:
    """report.json: every model's metrics, the tuned model's margins over each baseline, the
    probes, the gates and their verdict, the data and the training run."""
    from sectune.evaluation.gates import gate_verdict
    from sectune.training.distributed import describe

    gates_passed, verdict = gate_verdict(gates)
    tuned = models["tuned"]
    return RunReport(
        job=name,
        run=run_id,
        task=spec.task.type,
        models=models,
        deltas={
            base: {m: tuned[m] - metrics[m] for m in RESULT_METRICS if m in metrics and m in tuned}
            for base, metrics in models.items()
            if base != "tuned"
        },
        probes=probes,
        previous_version=previous_version,
        gates=gates,
        gates_passed=gates_passed,
        verdict=verdict,
        data=data.report,
        training={
            "objective": "label-set cross-entropy (task.head: classifier)"
            if spec.task.type == "classification" and spec.task.head == "classifier"
            else "next-token cross-entropy on the target",
            "steps": result.steps,
            "worldSize": loaded.accelerator.num_processes,
            "distributed": describe(loaded.accelerator),
            "numerics": loaded.numerics.describe(),
            "resumedFrom": result.resumed_from,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 1),
            "tokensPerSecond": round(result.tokens / max(result.seconds, 1e-9), 1),
            "truncated": result.truncated,
            "dropped": result.dropped,
            "finalLoss": result.history[-1]["loss"] if result.history else None,
        },
        hardware=placement.describe_hardware(),
    )


def build_manifest(
    name: str,
    run_id: str,
    started: dt.datetime,
    spec: JobSpec,
    data: Any,
    loaded: _Loaded,
    tuned: dict[str, Any],
    gates: list[GateOutcome],
    gates_passed: bool,
) -> AdapterManifest:
    """The lineage manifest (sectune.contract.AdapterManifest); artifacts.publish adds the
    files' digests and writes it last."""
    return AdapterManifest(
        job=name,
        run=run_id,
        sectune_version=__version__,
        start_time=started.isoformat(),
        end_time=dt.datetime.now(dt.UTC).isoformat(),
        base_model=ManifestBaseModel(
            uri=spec.base_model.uri,
            sha256=loaded.resolved.digest,
            quantization=spec.base_model.quantization,
        ),
        method=spec.method.type,
        config=spec.model_dump(mode="json", by_alias=True),
        dataset=ManifestDataset(
            digest=data.report.digest,
            counts=data.report.counts,
            sources=data.report.sources,
            quality=data.audit.summary() if data.audit else None,
            provenance=data.report.provenance,
        ),
        redactions=data.report.redactions,
        canaries={"count": len(data.canaries)},
        metrics=tuned,
        gates=gates,
        gates_passed=gates_passed,
        # What serving compares its inputs with (sectune.serving.drift).
        reference={"promptTokens": prompt_length_reference(loaded.tokenizer, spec, data)},
    )


def _publish(
    spec: JobSpec,
    name: str,
    run_id: str,
    workdir: Path,
    loaded: _Loaded,
    weights: dict[str, Any] | None,
    report: RunReport,
    data: Any,
    result: Any,
    manifest: AdapterManifest,
) -> Any:
    """Stage the adapter, reports and training log, then publish them (manifest last; the
    current pointer moves only if the gates passed)."""
    from sectune import artifacts
    from sectune.evaluation.report import render_html

    stage = workdir / "stage"
    (stage / "adapter").mkdir(parents=True)
    loaded.model.save_pretrained(stage / "adapter", safe_serialization=True, state_dict=weights)
    loaded.tokenizer.save_pretrained(stage / "adapter")
    (stage / "report.json").write_text(report.to_json())
    (stage / "report.html").write_text(render_html(report))
    (stage / "data-report.json").write_text(data.report.to_json())
    (stage / "training-log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in result.history))
    return artifacts.publish(
        stage, job_prefix(spec, name), run_id, manifest, make_current=bool(manifest.gates_passed)
    )
