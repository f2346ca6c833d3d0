"""What crosses the boundaries of the data plane: the trainer pod's interface (its command,
metrics port, progress metrics, termination-message path and exit codes, which the operator's
Job builder and status reader rely on), the result the trainer writes as its termination
message, and the lineage manifest stored with every version.

Typed and versioned. `TrainerResult` (its `version`) is written by the trainer
(`TrainerResult.to_message`) and parsed by the operator (`TrainerResult.parse`); a result from a
trainer before the version field parses as version 1. `AdapterManifest` (its `apiVersion`) is
written by the trainer (`runner`, through `artifacts.publish`) and parsed, from the stored bytes
whose digest was checked, by everything that reads a version: the server, `sectune evaluate`,
`sectune fetch-adapters`, `sectune promote`. Readers are tolerant: an unknown field is ignored,
so a newer writer never breaks an older reader.
"""

from __future__ import annotations

import json
import time
from enum import IntEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from sectune.config import GateMetric

SCHEMA = 1
"""The version of TrainerResult this code writes."""
RESULT_METRICS: tuple[GateMetric, ...] = ("accuracy", "macroF1", "validationLoss")
"""The tuned model's figures a result carries into status.metrics (those it has), and the
report compares with each baseline. Metric names are sectune.config.GateMetric's."""
MESSAGE_LIMIT = 4096
"""Kubernetes keeps 4 KiB of a container's termination message."""


# --------------------------------------------------------------------------- the trainer's pod

TRAIN_MODULE = "sectune.cli"
"""The trainer's module, for launchers that start Python themselves (torchrun, accelerate)."""
TRAIN_ARGS = ("train", "--config")
"""`sectune train --config <file>`: the arguments of the trainer; the file is the JobSpec."""
METRICS_PORT = 9400
"""Where a running trainer serves its progress (TrainingProgress) for Prometheus."""
TERMINATION_LOG = "/dev/termination-log"
"""Where the trainer writes its TrainerResult; Kubernetes keeps it as the termination message."""


class ExitCode(IntEnum):
    """Exit codes of `sectune train`, read by the training Job's Pod failure policy."""

    OK = 0
    INFRASTRUCTURE = 1
    """Anything unexpected (storage down, node lost): retried, resuming from the checkpoint."""
    BAD_INPUT = 2
    """Bad config or data: retrying cannot help; the Job fails at once with the message."""
    GATES_FAILED = 3
    """The adapter was trained and stored but did not meet its gates: fails at once."""
    PREEMPTED = 143
    """Stopped by SIGTERM after writing a checkpoint: retried."""


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


PROGRESS_PREFIX = "sectune_train_"


class TrainingProgress(_Tolerant):
    """One optimizer step's progress: what the training loop reports, what the trainer
    exports on METRICS_PORT as sectune_train_<field> gauges, and what the operator reads back
    into status.progress."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    step: int
    """Optimizer steps done."""
    total_steps: int
    """Optimizer steps planned."""
    loss: float = 0.0
    """Training loss of the last step."""
    learning_rate: float = 0.0
    """Learning rate of the last step."""
    tokens_per_second: float = 0.0
    """Training throughput since start."""
    eta_seconds: float = 0.0
    """Estimated seconds to the end of training."""
    epoch: float = 0.0
    """Epochs done, fractional (not exported)."""

    EXPORTED: ClassVar[tuple[str, ...]] = (
        "step",
        "total_steps",
        "loss",
        "learning_rate",
        "tokens_per_second",
        "eta_seconds",
    )

    @classmethod
    def from_exposition(cls, text: str) -> TrainingProgress | None:
        """The progress in a Prometheus exposition, or None before the first step."""
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(PROGRESS_PREFIX):
                    values[sample.name.removeprefix(PROGRESS_PREFIX)] = sample.value
        if "step" not in values or "total_steps" not in values:
            return None
        exported = {k: v for k, v in values.items() if k in cls.EXPORTED}
        return cls.model_validate(
            exported | {"step": int(values["step"]), "total_steps": int(values["total_steps"])}
        )


class ResultAdapter(_Tolerant):
    """The stored adapter (also a FineTuneJob's status.adapter)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    uri: str | None = None
    """Where the adapter version is stored."""
    sha256: str | None = None
    """sha256 of its manifest.json (which lists the digest of every file)."""
    size_bytes: int | None = None
    """The adapter's stored weights and tokenizer files, in bytes."""


class ResultGate(_Tolerant):
    """One gate as evaluated."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str
    """The gate, e.g. recall[critical]>=0.95."""
    passed: bool
    """Whether the gate passed."""
    value: float | None = None
    """The measured value (absent when the metric could not be measured)."""


class GateOutcome(ResultGate):
    """One gate as evaluated, whole: what the report and the lineage manifest record (the
    trainer's result and a FineTuneJob's status carry the ResultGate part)."""

    metric: str = ""
    min: float | None = None
    max: float | None = None
    reason: str = ""
    """Why the gate could not be measured (its metric or baseline is missing)."""


class DataQuality(_Tolerant):
    """What the data audit found (sectune.data.audit), in counts: written by the trainer into
    its result, the report and the lineage manifest; shown as status.dataset.quality."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    train_rows: int = 0
    """Training rows audited (after validation, sanitization and deduplication)."""
    held_out_rows: int = 0
    """Held-out rows audited (validation and test)."""
    suspected_label_errors: int | None = None
    """Training rows whose label the audit's out-of-fold classifier confidently disagrees
    with (confident learning); absent when not measured (not classification, too few rows)."""
    near_duplicates: int = 0
    """Training rows that nearly duplicate an earlier training row."""
    conflicting: int = 0
    """Training rows whose near-identical input carries a different label."""
    leaked_held_out: int = 0
    """Held-out rows that nearly duplicate a training row."""
    labels_under_minimum: list[str] = Field(default_factory=list)
    """Labels with fewer training rows than dataset.quality.minExamplesPerLabel."""
    broken_limits: list[str] = Field(default_factory=list)
    """The dataset.quality limits the data broke (the job fails before training)."""


class DataReport(_Tolerant):
    """What the data stage saw (sectune.data.prepare): data-report.json, the `data` of a
    training run's report.json, `sectune data check`'s output; the trainer's result and the
    lineage manifest take their dataset figures from it."""

    sources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per split, the file it was read from and its rows."""
    uri: str | None = None
    """The data an evaluation (`sectune evaluate`) read."""
    examples: int | None = None
    """The examples an evaluation scored."""
    digest: str | None = None
    """sha256 over the data files (with dataset.feedback, combined with the sha256 over the
    verdict objects read)."""
    provenance: dict[str, Any] | None = None
    """The review record the training file came with (`sectune data review apply`)."""
    skipped: dict[str, Any] | None = None
    """Invalid rows left out (dataset.onInvalid: skip): count, and the first rows' problems."""
    sanitize: dict[str, Any] = Field(default_factory=dict)
    """Redactions per entity type, and whether sanitizing was on."""
    deduplicated: dict[str, int] | None = None
    test_source: str | None = None
    """"validation" when no test set was given."""
    audit: dict[str, Any] | None = None
    """The data audit's findings (sectune.data.audit.DataAudit)."""
    canaries: dict[str, int] | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    """Examples per split after validation, sanitization and deduplication."""
    class_balance: dict[str, int] | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def redactions(self) -> dict[str, int]:
        return dict(self.sanitize.get("redactions", {}))

    @property
    def skipped_rows(self) -> int:
        return int((self.skipped or {}).get("count", 0))

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


class ResultDataset(_Tolerant):
    digest: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    """Examples per split after validation, sanitization and deduplication: train,
    validation, test."""
    skipped: int = 0
    """Invalid rows left out (dataset.onInvalid: skip)."""
    redactions: dict[str, int] = Field(default_factory=dict)
    quality: DataQuality | None = None


class TrainerResult(_Tolerant):
    """The trainer's result, as its termination message."""

    version: int = SCHEMA
    """The schema of this result (SCHEMA when written by this code; 1 when absent)."""
    phase: str = ""
    """Succeeded, Failed, or Training (preempted: the Job retries). The operator takes the
    phase from the Job; a result without one still gives its reason and message."""
    reason: str = ""
    """CamelCase: GatesPassed, GatesFailed, InvalidInput, InvalidConfig, StorageError, …"""
    message: str = ""
    adapter: ResultAdapter | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: list[ResultGate] = Field(default_factory=list)
    dataset: ResultDataset | None = None
    exit_code: int | None = None
    """Filled in by the reader from the container status, never written by the trainer."""

    def to_message(self, limit: int = MESSAGE_LIMIT) -> str:
        """Compact JSON within `limit` bytes: gates are dropped from the end, then the message
        is cut, until it fits."""
        result = self.model_copy(deep=True)

        def dump() -> str:
            return result.model_dump_json(by_alias=True, exclude_none=True, exclude={"exit_code"})

        text = dump()
        while len(text.encode()) > limit and result.gates:
            result.gates.pop()
            text = dump()
        while len(text.encode()) > limit and result.message:
            result.message = result.message[: len(result.message) // 2]
            text = dump()
        return text

    @classmethod
    def parse(cls, text: str, exit_code: int | None = None) -> TrainerResult | None:
        """The result in a termination message, or None when it is not one (a log tail)."""
        try:
            result = cls.model_validate_json(text)
        except ValidationError:
            return None
        result.exit_code = exit_code
        return result

    @classmethod
    def failure(cls, reason: str, message: str, phase: str = "Failed") -> TrainerResult:
        return cls(phase=phase, reason=reason, message=message[:3000])

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- decisions


class DecisionRule(BaseModel):
    """How a version turns probabilities into a label when the job set `task.recallTargets`:
    the first label in `order` whose probability reaches its threshold, else the most likely
    one. Fitted by the evaluation (sectune.evaluation.decision), stored in report.json
    (`models.tuned.decision.rule`) and applied by the server's /v1/classify."""

    thresholds: dict[str, float]
    order: list[str]

    def decide(self, probabilities: Any, labels: Any) -> int:
        """The index of the label decided."""
        for label in self.order:
            column = labels.index(label)
            if probabilities[column] >= self.thresholds[label]:
                return int(column)
        return max(range(len(labels)), key=probabilities.__getitem__)


# --------------------------------------------------------------------------- analysts' verdicts


def timestamp(at: float) -> str:
    """UTC, to the second, as every stored record writes times."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class FeedbackRecord(BaseModel):
    """One analyst's verdict as the server stores it (`sectune.serving.feedback`) and a
    training job reads it back (`dataset.feedback`): a row in the training format of the
    adapter's task — the input fields and `label` for classification, `messages` for chat,
    `prompt` + `completion` for completions — with what the analyst decided under `feedback`
    (adapter, version, task, predicted, verdict, inputSha256, predictedAt, judgedAt, caller,
    and the optional probabilities, reviewer, comment)."""

    model_config = ConfigDict(extra="allow")

    id: str
    label: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    feedback: dict[str, Any]

    @property
    def input_fields(self) -> dict[str, str]:
        """A classification verdict's input fields (text, or the template's fields)."""
        return {k: v for k, v in (self.model_extra or {}).items() if isinstance(v, str)}

    @property
    def judged_at(self) -> float | None:
        import calendar

        try:
            parsed = time.strptime(str(self.feedback.get("judgedAt")), "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            return None
        return float(calendar.timegm(parsed))

    def line(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True), ensure_ascii=False)


# --------------------------------------------------------------------------- run report


class RunReport(_Tolerant):
    """report.json: what a training run (`runner`), `sectune evaluate` on a stored version
    (`evaluation.suite`) or on a served endpoint (`evaluation.remote`) measured. One model for
    the three writers and every reader (the CLI's summary, report.html, the server's drift
    reference and baselines, later evaluations); fields a writer does not set are left out of
    the file."""

    job: str | None = None
    run: str | None = None
    task: str | None = None
    endpoint: str | None = None
    """The served API an endpoint evaluation asked."""
    adapter: dict[str, Any] | None = None
    """The version evaluated (uri, sha256; model for an endpoint)."""
    data: DataReport | None = None
    """What the data stage saw (training), or the evaluation data's uri, count and
    redactions."""
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Metrics per model: tuned, the baselines (base, fewShot, tfidf, previous), training."""
    deltas: dict[str, dict[str, float]] = Field(default_factory=dict)
    """The tuned model's margin over each baseline, for RESULT_METRICS."""
    consistency: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Served against training time, per metric (endpoint evaluations)."""
    baselines_from: str | None = None
    worth_it: str | None = None
    probes: dict[str, Any] = Field(default_factory=dict)
    previous_version: dict[str, str] | None = None
    gates: list[GateOutcome] = Field(default_factory=list)
    verdicts: dict[str, Any] | None = None
    """The held-out analysts' verdicts (dataset.feedback.holdOut): rows, and the tuned and
    previous versions' metrics on them (what gates `basis: verdicts` read)."""
    gates_passed: bool = True
    verdict: str = ""
    training: dict[str, Any] | None = None
    hardware: str | None = None
    numerics: str | None = None

    @property
    def tuned(self) -> dict[str, Any]:
        return self.models.get("tuned", {})

    def baselines(self) -> dict[str, dict[str, Any]]:
        """The baselines it measured (base, fewShot, tfidf, previous), without the per-row
        tables: what a later evaluation's gates over a baseline compare with."""
        return {
            name: {k: v for k, v in metrics.items() if k not in ("confusionMatrix", "calibration")}
            for name, metrics in self.models.items()
            if name not in ("tuned", "training")
        }

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    @classmethod
    def read(cls, path: Any) -> RunReport:
        """A stored report.json; an empty report when there is none."""
        from pathlib import Path

        report = Path(path)
        return cls.model_validate_json(report.read_text()) if report.exists() else cls()


# --------------------------------------------------------------------------- lineage manifest

MANIFEST_API_VERSION = "sectune.io/v1alpha1"
"""The AdapterManifest schema this code writes."""


class ManifestFile(_Tolerant):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ManifestBaseModel(_Tolerant):
    uri: str
    sha256: str
    """sha256 over the base model's weight files: a version is served only on this base."""
    quantization: str = "none"


class ManifestDataset(_Tolerant):
    digest: str | None = None
    counts: dict[str, int] | None = None
    sources: Any = None
    quality: DataQuality | None = None
    provenance: dict[str, Any] | None = None
    """The review record the training data came with (`sectune data review apply`): who
    reviewed which rows, when, and the digest of the result."""


class AdapterManifest(_Tolerant):
    """manifest.json of one stored version: what was trained, from what, how it scored, and the
    digest and size of every file stored with it (written last, so its presence means the
    version is complete)."""

    api_version: str = MANIFEST_API_VERSION
    kind: str = "AdapterManifest"
    job: str
    run: str
    sectune_version: str = ""
    start_time: str = ""
    end_time: str = ""
    base_model: ManifestBaseModel
    method: str
    """lora, qlora (an adapter) or full, continued-pretraining (a whole model)."""
    config: dict[str, Any]
    """The job spec it was trained with (sectune.config.JobSpec, camelCase)."""
    dataset: ManifestDataset = Field(default_factory=ManifestDataset)
    redactions: dict[str, int] = Field(default_factory=dict)
    canaries: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    gates: list[GateOutcome] = Field(default_factory=list)
    gates_passed: bool | None = None
    """None for a version whose writer recorded no verdict."""
    reference: dict[str, Any] = Field(default_factory=dict)
    """What serving compares its inputs with (promptTokens: prompt-length shares)."""
    files: dict[str, ManifestFile] = Field(default_factory=dict)

    @field_validator("metrics", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if isinstance(v, int | float) and v is not True}
        return value

    def failing_gates(self) -> list[str]:
        return [g.name for g in self.gates if not g.passed]

    def stored_bytes(self, prefix: str = "adapter/") -> int:
        return sum(f.size for name, f in self.files.items() if name.startswith(prefix))

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True).encode()

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
