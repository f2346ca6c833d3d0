"""The evaluation a job (or `sectune evaluate`) runs: the same measurements for the base model,
the baselines and the tuned model, so the report compares like with like."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sectune.config import JobSpec
from sectune.contract import DataReport, RunReport
from sectune.data.example import Example
from sectune.data.prepare import PreparedData
from sectune.evaluation.metrics import (
    classification_metrics,
    extraction_metrics,
    generation_metrics,
    latency_summary,
    without_leaked,
)
from sectune.evaluation.probes import (
    injection_probe,
    load_attacks,
    memorization_probe,
    regurgitation_probe,
)
from sectune.evaluation.scoring import (
    consistency,
    generate,
    score_labels,
    validation_loss,
    with_demonstrations,
)

CONSISTENCY_EXAMPLES = 48
GENERATION_EXAMPLES = 64
LATENCY_REQUESTS = 20


def classify(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    autocast: bool,
    latency: int = 0,
    leaked: set[str] | frozenset[str] = frozenset(),
    decide: bool = False,
) -> dict[str, Any]:
    """Classification metrics of one model on `examples` (plus latency and throughput).
    `leaked`: ids of held-out rows that nearly duplicate training rows (the data audit); the
    headline figures are also given without them (`macroF1WithoutLeaked`, ...)."""
    labels = spec.task.labels
    scores = score_labels(
        model, tokenizer, examples, spec, autocast=autocast, measure_latency=latency
    )
    predictions = scores.predictions(labels)
    metrics = classification_metrics(
        [e.target for e in examples], predictions, labels, scores.probabilities
    )
    metrics |= without_leaked(examples, predictions, labels, leaked)
    if decide and spec.task.recall_targets:  # the tuned model's rule (task.recallTargets)
        from sectune.evaluation import decision

        metrics["decision"] = decision.evaluate(
            scores.probabilities,
            [e.target for e in examples],
            labels,
            dict(spec.task.recall_targets),
            spec.hyperparameters.seed,
        )
    if latency:
        metrics |= latency_summary(scores.latencies_ms) | {"throughputPerSecond": scores.throughput}
    return metrics


BASELINE_NAMES = ("base", "fewShot")


def baselines(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    spec: JobSpec,
    autocast: bool,
    which: tuple[str, ...] = BASELINE_NAMES,
) -> dict[str, dict[str, Any]]:
    """The base model before training: zero-shot with the job's prompt, and (classification)
    with k retrieved training examples in the prompt; only those named in `which`."""
    if spec.task.type != "classification":
        if "base" not in which:
            return {}
        return {"base": {"validationLoss": validation_loss(model, tokenizer, data.test, spec)}}
    measured = {}
    if "base" in which:
        measured["base"] = classify(
            model, tokenizer, data.test, spec, autocast, leaked=data.leaked_ids()
        )
    if "fewShot" in which:
        measured["fewShot"] = classify(
            model,
            tokenizer,
            with_demonstrations(data.test, data.train),
            spec,
            autocast,
            leaked=data.leaked_ids(),
        )
    return measured


def score_previous(
    model: Any,
    tokenizer: Any,
    data: PreparedData,
    spec: JobSpec,
    autocast: bool,
    base_digest: str,
    workdir: Path,
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, str]]:
    """The metrics of `evaluation.previousVersion` on the same held-out data (and on the held-out
    analysts' verdicts, when there are any), and where it came from. It is fetched with every digest verified, safetensors only, and must have been
    trained on this base model; it is loaded next to the tuned adapter and removed after."""
    from sectune import artifacts, storage
    from sectune.serving import verify

    previous = spec.evaluation.previous_version
    assert previous is not None
    directory = workdir / "previous-version"
    try:
        version_uri, sha256 = verify.resolve(previous.uri, previous.sha256)
        manifest = verify.fetch(
            version_uri,
            sha256,
            directory,
            include=("adapter/",),
            max_bytes=artifacts.MAX_ARTIFACT_BYTES,
            passed_gates=False,  # the version it replaces, whatever its verdict
            base_digest=base_digest,
        )
    except verify.LoadError as exc:
        # Storage down is retried (infrastructure); anything else is the manifest's to fix.
        error = storage.StorageError if exc.reason == "storage" else artifacts.IntegrityError
        raise error(f"evaluation.previousVersion: {exc}") from None
    model.load_adapter(str(directory / "adapter"), adapter_name="previous")
    model.set_adapter("previous")
    try:
        on_verdicts = None
        if spec.task.type == "classification":
            metrics = classify(
                model, tokenizer, data.test, spec, autocast, leaked=data.leaked_ids()
            )
            if data.verdicts:
                on_verdicts = classify(model, tokenizer, data.verdicts, spec, autocast)
        else:
            metrics = {"validationLoss": validation_loss(model, tokenizer, data.test, spec)}
    finally:
        model.set_adapter("default")
        model.delete_adapter("previous")
    return metrics, on_verdicts, {"uri": version_uri, "sha256": sha256, "run": manifest.run}


def _generation_metrics(
    model: Any, tokenizer: Any, examples: list[Example], spec: JobSpec, metrics: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    sample = examples[:GENERATION_EXAMPLES]
    outputs = generate(model, tokenizer, sample, spec)
    references = [e.target for e in sample]
    schema = spec.task.output_schema
    if spec.task.type == "extraction" and schema is not None:
        metrics = metrics | extraction_metrics(outputs, references, schema)
        # As served: held to the schema while decoding (sectune.constrained).
        held = generate(model, tokenizer, sample, spec, schema=schema)
        metrics["constrained"] = extraction_metrics(held, references, schema)
    else:
        metrics = metrics | generation_metrics(outputs, references)
    samples = [
        {"output": o, "reference": r} for o, r in zip(outputs[:5], references[:5], strict=False)
    ]
    return metrics, {"samples": samples}


def evaluate_tuned(
    model: Any, tokenizer: Any, data: PreparedData, spec: JobSpec, autocast: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of the tuned model and the probe results (injection, memorization)."""
    probes: dict[str, Any] = {}
    raw_text = spec.method.type == "continued-pretraining" or spec.dataset.format == "completion"
    if spec.task.type != "classification":
        metrics: dict[str, Any] = {
            "validationLoss": validation_loss(model, tokenizer, data.test, spec)
        }
        # Raw text has no prompt to answer: there, held-out loss is the measure.
        if not raw_text:
            metrics, probes = _generation_metrics(model, tokenizer, data.test, spec, metrics)
    else:
        metrics = classify(
            model,
            tokenizer,
            data.test,
            spec,
            autocast,
            latency=LATENCY_REQUESTS,
            leaked=data.leaked_ids(),
            decide=True,
        )
        metrics["consistency"] = consistency(
            model, tokenizer, data.test[:CONSISTENCY_EXAMPLES], spec, autocast
        )
        if spec.evaluation.injection_probes:
            labels = spec.task.labels

            def predict(examples: list[Example]) -> list[str]:
                return score_labels(
                    model, tokenizer, examples, spec, autocast=autocast
                ).predictions(labels)

            probes["injection"] = injection_probe(
                predict, data.test, spec, load_attacks(), limit=spec.evaluation.probe_examples
            )
            metrics["injectionFlipRate"] = probes["injection"]["injectionFlipRate"]
            metrics["injectionSuccessRate"] = probes["injection"]["injectionSuccessRate"]
    if spec.evaluation.memorization_probes and data.canaries:
        memorization = memorization_probe(
            model, tokenizer, spec, data.train, spec.hyperparameters.seed
        )
        prefixes = [c.rsplit(" ", 1)[0] for c in data.canaries]
        memorization["regurgitation"] = regurgitation_probe(
            model, tokenizer, prefixes, data.canaries
        )
        probes["memorization"] = memorization
        metrics["canaryExposure"] = memorization["canaryExposure"]
    return metrics, probes


def load_labelled(data_uri: str, spec: JobSpec) -> tuple[list[Example], dict[str, Any]]:
    """Labelled data for evaluation, validated (the job's onInvalid policy) and sanitized as
    the job's training data was. Returns the examples and the sanitizer's report."""
    from sectune.data.prepare import load_examples, raise_or_report, sanitize_examples

    problems: list[str] = []
    examples = load_examples(data_uri, spec, problems, {})
    raise_or_report(problems, spec, DataReport())
    sanitizer = sanitize_examples(examples, spec)
    return examples, sanitizer.report.as_dict()


REMEASURABLE = ("tfidf", "base", "fewShot")
"""Baselines `sectune evaluate --baselines` can measure again on the rows in hand."""


def remeasure_baselines(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    trained_on: str | None,
    wanted: tuple[str, ...],
    autocast: bool,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Baselines measured again on `examples`, and notes on what could not be: TF-IDF re-fit on
    the job's own training data (found through its config, refused if its digest is no longer
    `trained_on`), the base model zero-shot and few-shot (the adapter switched off)."""
    from sectune.data.load import DataError
    from sectune.data.prepare import PreparedData, prepare_data
    from sectune.evaluation.baselines import tfidf_baseline
    from sectune.storage import StorageError

    measured: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    if spec.task.type != "classification":
        wanted = tuple(w for w in wanted if w == "base")
    train: list[Example] = []
    if {"tfidf", "fewShot"} & set(wanted):
        try:
            prepared = prepare_data(spec)
        except (DataError, StorageError, OSError) as exc:
            notes.append(f"the job's training data could not be read ({exc})")
        else:
            if prepared.report.digest != trained_on:
                notes.append(
                    f"the job's training data at {spec.dataset.train} changed since training"
                )
            else:
                train = prepared.train
    if "tfidf" in wanted and train:
        measured["tfidf"] = tfidf_baseline(
            train, examples, spec.task.labels, spec.hyperparameters.seed
        )
    # Few-shot needs the training examples as demonstrations.
    scored = tuple(w for w in ("base", "fewShot") if w in wanted and (train or w != "fewShot"))
    if scored and hasattr(model, "disable_adapter"):
        data = PreparedData(train=train, validation=examples, test=examples)
        with model.disable_adapter():
            measured |= baselines(model, tokenizer, data, spec, autocast, which=scored)
    return measured, notes


def worth_it(tuned: dict[str, Any], compared: dict[str, dict[str, Any]]) -> str:
    """One line a security engineer can act on: does the adapter beat the baselines here?"""
    metric = "macroF1" if "macroF1" in tuned else "validationLoss"
    if metric not in tuned or not compared:
        return ""
    lower_is_better = metric == "validationLoss"
    parts, beaten = [], []
    for name, metrics in compared.items():
        if metric not in metrics:
            continue
        wins = (
            tuned[metric] < metrics[metric] if lower_is_better else tuned[metric] > metrics[metric]
        )
        parts.append(f"{name} {metrics[metric]:.3f}")
        beaten.append(wins)
    if not parts:
        return ""
    verdict = "worth it" if all(beaten) else "not worth it"
    losers = [p for p, won in zip(parts, beaten, strict=True) if not won]
    against = f" (does not beat {', '.join(losers)})" if losers else ""
    return f"{metric} {tuned[metric]:.3f} vs {', '.join(parts)} on these rows: {verdict}{against}"


def evaluate_stored(
    adapter_uri: str,
    data_uri: str,
    gates_path: str | None,
    precision: str = "auto",
    remeasure: tuple[str, ...] = ("tfidf",),
    recall_targets: dict[str, float] | None = None,
) -> RunReport:
    """`sectune evaluate`: a stored adapter (digests verified) on any labelled data, against
    its own gates or those in `gates_path` (a YAML list), on this process's device with the
    numerics sectune.placement picks for `precision`. The baselines in `remeasure` are
    measured again on the same rows (the rest come from the training-time report);
    `recall_targets` replaces the job's task.recallTargets for this evaluation (what a rule
    would give on these rows). Returns the report."""
    import tempfile
    from pathlib import Path

    from pydantic import TypeAdapter

    from sectune import artifacts, placement
    from sectune.config import Gate
    from sectune.data.prepare import PreparedData
    from sectune.evaluation.gates import evaluate_gates, gate_verdict
    from sectune.serving import verify
    from sectune.training import base_model
    from sectune.yamlio import load_yaml

    version, sha256 = artifacts.locate_version(adapter_uri)
    with tempfile.TemporaryDirectory(
        prefix="sectune-evaluate-", ignore_cleanup_errors=True
    ) as scratch:
        workdir = Path(scratch)
        # Every file checked against the manifest, each read once.
        manifest = artifacts.fetch_verified(version, sha256, workdir, include=("",))
        spec = JobSpec.model_validate(manifest.config)
        if recall_targets is not None:
            task = spec.task.model_dump(by_alias=True) | {"recallTargets": recall_targets}
            spec = JobSpec.model_validate(spec.model_dump(by_alias=True) | {"task": task})
        adapter_dir = workdir / "adapter"

        examples, sanitized = load_labelled(data_uri, spec)

        resolved = base_model.resolve(spec.base_model)
        verify.check(  # adapter or whole model alike; the verdict is what is measured here
            manifest,
            workdir,
            version,
            passed_gates=False,
            base_digest=None,
            adapter_only=False,
        )
        numerics = placement.for_evaluation(precision, spec.method.type)
        if (adapter_dir / "adapter_config.json").exists():
            from peft import PeftModel

            model, tokenizer = base_model.load(
                resolved, spec.base_model, numerics.weights_dtype, numerics.device
            )
            model = PeftModel.from_pretrained(model, adapter_dir)
        else:  # full fine-tuning stored the whole model
            model, tokenizer = base_model.load(
                base_model.ResolvedModel(adapter_dir, version, ""),
                spec.base_model,
                numerics.weights_dtype,
                numerics.device,
            )
        model.eval()
        data = PreparedData(train=[], validation=examples, test=examples)
        spec = spec.model_copy(
            update={"evaluation": spec.evaluation.model_copy(update={"memorization_probes": False})}
        )
        metrics, probes = evaluate_tuned(
            model, tokenizer, data, spec, numerics.autocast is not None
        )
        gates = spec.evaluation.gates
        if gates_path:
            gates = TypeAdapter(list[Gate]).validate_python(load_yaml(Path(gates_path).read_text()))
        from_training = RunReport.read(workdir / "report.json").baselines()
        measured, notes = remeasure_baselines(
            model,
            tokenizer,
            examples,
            spec,
            manifest.dataset.digest,
            remeasure,
            numerics.autocast is not None,
        )
        compared = from_training | measured
        outcomes = evaluate_gates(gates, metrics, compared)
        passed, verdict = gate_verdict(outcomes)
        return RunReport(
            job=manifest.job,
            adapter={"uri": version, "sha256": sha256},
            data=DataReport(uri=data_uri, examples=len(examples), sanitize=sanitized),
            models={"tuned": metrics, **measured, "training": manifest.metrics},
            baselines_from=_baselines_from(measured, from_training, notes),
            worth_it=worth_it(metrics, measured),
            probes=probes,
            gates=outcomes,
            gates_passed=passed,
            verdict=verdict,
            hardware=placement.describe_hardware(),
            numerics=numerics.describe(),
        )


def _baselines_from(
    measured: dict[str, Any], from_training: dict[str, Any], notes: list[str]
) -> str | None:
    """Where the report's baselines come from, said plainly."""
    from sectune.evaluation.gates import BASELINES_FROM

    parts = []
    if measured:
        parts.append(f"these rows: {', '.join(measured)} (re-measured now)")
    rest = [name for name in from_training if name not in measured]
    if rest:
        parts.append(f"{', '.join(rest)}: {BASELINES_FROM}")
    if notes:
        parts.append("not re-measured because " + "; ".join(notes))
    return "; ".join(parts) or None
