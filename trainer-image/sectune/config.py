"""The job contract: what to fine-tune, on which data, how, how to judge it, where to put it.

One typed source. `sectune run` parses a FineTuneJob manifest with it, the operator hands the
same model (as JSON) to the training pod, and the operator generates the CRD schema from it,
so the three can never disagree. Pure pydantic: importing this module never imports torch.

Python names are snake_case; manifests use the camelCase aliases (`learningRate`).
Cross-field rules are pydantic validators here (for `sectune run` and the trainer); the CEL rule
the API server enforces for each is the operator's (`sectune_operator.cel`), sharing the
validator's message; the round-trip tests keep the two in step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "sectune.io"
API_VERSION = "v1alpha1"
FINETUNEJOB_KIND = "FineTuneJob"

# The first segment (bucket, org, or empty for file:///) may not hold "user:secret@":
# credentials never travel inside a URI.
URI_PATTERN = r"^(s3|hf|file)://[^/:@\s]*(/\S*)?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
JOB_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_JOB_NAME = 52
"""A FineTuneJob's children are named <name>-train (Job, ConfigMap, headless Service: DNS-1035
labels of at most 63 characters) and indexed pods are reached as <name>-train-<index>: 52
leaves room for 999 nodes."""

Uri = Annotated[
    str,
    Field(
        pattern=URI_PATTERN,
        max_length=1024,
    ),
]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]

PREVIOUS_GATE_MESSAGE = "evaluation.gates: overBaseline: previous needs evaluation.previousVersion"
HF_DATASET_MESSAGE = (
    "dataset.{field}: hf:// datasets are not implemented yet (the hub is a source of base "
    "models only); copy the files to s3:// (file:// with sectune run)"
)
RECALL_TARGETS_MESSAGE = "task.recallTargets is only for type classification; remove it"
DECISION_GATE_MESSAGE = (
    "evaluation.gates: basis: decision reads the rule task.recallTargets fits; set recallTargets, "
    "and compare with no baseline"
)
VERDICT_GATE_MESSAGE = (
    "evaluation.gates: basis: verdicts scores the newest analysts' verdicts held out from "
    "training; set dataset.feedback.holdOut above 0 (classification)"
)
VERDICT_GATE_BASELINE_MESSAGE = (
    "evaluation.gates[{metric}]: basis: verdicts compares only with the previous version "
    "(baselines are measured on the held-out set); use overBaseline: previous or none"
)
QUANTIZED_FULL_MESSAGE = (
    "baseModel.quantization: method full and continued-pretraining train every weight, which "
    "a quantized base cannot; set quantization: none, or method: qlora"
)
FORMAT_GATE_MESSAGE = (
    "evaluation.gates: formatCompliance of a classification task is always 1.0 (the answer is "
    "chosen from task.labels), so the gate could never fail; gate on macroF1, recall or "
    "accuracy instead"
)

#: Spec fields that only the operator reads (scheduling, identity, lifecycle). A manifest for
#: `sectune run` may carry them; they are reported and ignored locally. The operator's CRD model
#: adds exactly these (a unit test holds the two in step).
CLUSTER_ONLY_FIELDS: dict[str, frozenset[str]] = {
    "spec": frozenset(
        {
            "image",
            "imagePullSecrets",
            "serviceAccountName",
            "hfTokenSecret",
            "cleanupPolicy",
            "queueName",
            "suspend",
            "activeDeadlineSeconds",
            "backoffLimit",
        }
    ),
    "resources": frozenset(
        {"cpu", "memory", "nodeSelector", "tolerations", "priorityClassName", "sharedMemory"}
    ),
}


class Spec(BaseModel):
    """Base for every part of the contract: camelCase in manifests, unknown keys refused."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )


class SecretReference(Spec):
    """A Secret in the job's namespace; credentials are never written inline."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-.a-z0-9]*[a-z0-9])?$")
    """Name of the Secret."""


# --------------------------------------------------------------------------- base model


class BaseModelSpec(Spec):
    """The open model to start from."""

    uri: Uri
    """Where the weights are: hf://org/name@revision, s3://bucket/prefix, file:///dir, or a
    .gguf file (converted once to safetensors and cached by digest)."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """Load the base weights quantized: nf4 (4-bit NormalFloat, double quantization) is what
    QLoRA trains on; int8 saves memory for LoRA."""


# --------------------------------------------------------------------------- dataset


class FieldMapping(Spec):
    """Column names in the data files, when they differ from the defaults."""

    id: str = Field("id", max_length=128)
    """Unique example id (optional in the data; a content hash is used when absent)."""
    text: str = Field("text", max_length=128)
    """Input text (classification, extraction, completion)."""
    label: str = Field("label", max_length=128)
    """Target label (classification) or target output (extraction, generation)."""
    instruction: str = Field("instruction", max_length=128)
    """Instruction (instruction format)."""
    input: str = Field("input", max_length=128)
    """Optional input that goes with the instruction (instruction format)."""
    output: str = Field("output", max_length=128)
    """Expected answer (instruction format)."""
    messages: str = Field("messages", max_length=128)
    """List of {role, content} messages (chat format)."""


class SanitizeSpec(Spec):
    """Redaction of secrets and personal data before anything else reads the data."""

    enabled: bool = True
    """Replace secrets and PII with typed placeholders (<IP_1>, <USER_1>) per example."""
    allow: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=lambda: ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"],
        max_length=256,
    )
    """Values kept as they are: CIDR ranges for addresses (RFC 5737 documentation ranges by
    default) or exact strings (e.g. a public vendor domain)."""
    internal_domains: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=64
    )
    """DNS suffixes of the organisation (corp.example.com); hostnames under them are redacted."""


class CanarySpec(Spec):
    """Memorization probes: random secrets planted in the training data, measured afterwards."""

    count: int = Field(0, ge=0, le=100)
    """How many canary examples to insert (0 turns the probe off)."""
    repeats: int = Field(1, ge=1, le=100)
    """How often each canary is repeated in the training data."""


class QualitySpec(Spec):
    """The data audit every job runs before training (sectune.data.audit), and the limits that
    fail the job on bad data before any training time is spent. Findings are in the report,
    the lineage manifest and status.dataset.quality; `sectune data audit` shows the same."""

    audit: bool = True
    """Run the audit: suspected label errors (classification: confident learning on
    out-of-fold TF-IDF + logistic-regression probabilities), near-duplicates and conflicting
    labels within training, held-out rows that nearly duplicate training rows (leakage), and
    coverage (per-label counts, lengths, rows cut by maxSeqLength)."""
    near_duplicate_threshold: float = Field(0.8, ge=0.5, le=1.0)
    """Two rows are near-duplicates when the edit similarity of their inputs (lower-cased,
    spaces collapsed, placeholders unnumbered; 2 x matching characters / all characters) is at
    least this. One word changed in a 12-word alert scores about 0.9."""
    min_examples_per_label: int = Field(10, ge=0, le=1_000_000)
    """Coverage: a label with fewer training examples is reported (its per-class metrics will
    be noisy, and the model may not learn it)."""
    min_train_examples: int = Field(200, ge=0, le=100_000_000)
    """Coverage: fewer training examples than this are reported (with fewer than a few
    hundred, a model will likely overfit)."""
    max_label_errors: Fraction | None = None
    """Fail when more than this fraction of the training rows are suspected label errors
    (classification only)."""
    max_leakage: Fraction | None = None
    """Fail when more than this fraction of the held-out rows nearly duplicate a training row
    (every held-out metric would be flattered)."""
    max_conflicting: Fraction | None = None
    """Fail when more than this fraction of the training rows have a near-identical input with
    a different label (classification only)."""
    enforce_minimums: bool = False
    """Fail when a label is under minExamplesPerLabel or the training set under
    minTrainExamples (otherwise they are warnings)."""

    @model_validator(mode="after")
    def _limits_need_audit(self) -> QualitySpec:
        if not self.audit and self.has_limits():
            raise ValueError(QUALITY_AUDIT_MESSAGE)
        return self

    def has_limits(self) -> bool:
        return self.enforce_minimums or any(
            v is not None for v in (self.max_label_errors, self.max_leakage, self.max_conflicting)
        )


class FeedbackSource(Spec):
    """Analysts' verdicts on a served adapter (an AdapterDeployment's `feedback.store`, the
    adapter's folder in it) as extra training data: read after the held-out split, so never
    part of validation or test."""

    uri: Uri
    """The adapter's folder in the feedback store: `<store>/<adapter>` (every .jsonl under it)."""
    weight: float = Field(1.0, ge=0.1, le=10.0)
    """How much each verdict counts against a training row: verdicts are repeated this many
    times (2.5: every verdict twice, half of them, chosen with the seed, a third time; below 1
    a seeded sample of them)."""
    max_age_days: int = Field(90, ge=1, le=3650)
    """Verdicts judged longer ago than this are left out (counted as expired)."""
    hold_out: float = Field(0.0, ge=0.0, le=0.5)
    """The newest share of the verdicts kept out of training and scored as their own held-out
    set (classification), for gates with `basis: verdicts`: "no worse on what analysts
    corrected"."""


class DatasetSpec(Spec):
    """Training, validation and test data."""

    train: Uri
    """Training data (JSONL, CSV or Parquet)."""
    validation: Uri | None = None
    """Validation data; when absent, `validationSplit` of the training data is held out."""
    test: Uri | None = None
    """Held-out test data for the final evaluation; validation data is used when absent."""
    validation_split: Fraction = 0.2
    """Fraction of the training data held out (stratified by label) when no validation set
    is given."""
    format: Literal["classification", "instruction", "chat", "completion"] = "classification"
    """Row shape: classification (text, label), instruction (instruction, input, output),
    chat (messages), completion (text)."""
    fields: FieldMapping = Field(default_factory=FieldMapping)  # type: ignore[arg-type]
    """Column names, when they differ from the defaults."""
    sanitize: SanitizeSpec = Field(default_factory=SanitizeSpec)
    """PII and secret redaction (on by default)."""
    canaries: CanarySpec = Field(default_factory=CanarySpec)  # type: ignore[arg-type]
    """Memorization canaries."""
    on_invalid: Literal["fail", "skip"] = "fail"
    """What to do with a bad row: fail the job naming file, line and field, or skip it and
    report what was skipped."""
    on_too_long: Literal["truncate", "drop"] = "truncate"
    """What to do with an example longer than maxSeqLength (counted either way)."""
    max_train_examples: int | None = Field(None, ge=1, le=100_000_000)
    """Use at most this many training examples (sampled with the seed, stratified): a quick
    profile for laptops and demos."""
    max_eval_examples: int | None = Field(None, ge=1, le=100_000_000)
    """Evaluate on at most this many held-out examples (stratified sample)."""
    deduplicate: bool = True
    """Remove exact and near-duplicate examples before splitting."""
    quality: QualitySpec = Field(default_factory=QualitySpec)  # type: ignore[arg-type]
    """The data audit and the limits on what it finds."""
    feedback: FeedbackSource | None = None
    """Analysts' verdicts to train on as well (classification and chat data only): added to
    the training split after held-out rows are set aside, minus any whose input is a held-out
    row's."""

    # --------------------------------------------------------------------------- task

    @model_validator(mode="after")
    def _sources(self) -> DatasetSpec:
        for name in ("train", "validation", "test"):
            if (getattr(self, name) or "").startswith("hf://"):
                raise ValueError(HF_DATASET_MESSAGE.format(field=name))
        if self.feedback is not None and self.format not in ("classification", "chat"):
            raise ValueError(
                f"feedback: not implemented yet for format {self.format} (verdicts are stored "
                "as classification rows or chat messages); use format classification or chat"
            )
        if self.feedback is not None and self.feedback.uri.startswith("hf://"):
            raise ValueError(HF_DATASET_MESSAGE.format(field="feedback.uri"))
        return self


class TaskSpec(Spec):
    """What the model learns to do."""

    type: Literal["classification", "extraction", "generation"] = "classification"
    """classification: text -> one label; extraction: text -> JSON matching outputSchema;
    generation: free text."""
    labels: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=256
    )
    """The allowed labels (classification), at least two distinct ones."""
    output_schema: dict[str, Any] | None = Field(None, json_schema_extra={"x-preserve": True})
    """JSON Schema the output must match (extraction)."""
    system_prompt: str = Field("", max_length=8192)
    """System prompt. Short prompts train faster and, on small models, often better."""
    template: str = Field("{text}", max_length=8192)
    """User message template; {text} (and for instruction data {instruction}, {input}) are
    filled from the row."""
    head: Literal["lm", "classifier"] = "lm"
    """Classification only. lm: trained to generate the label as text (next-token loss on every
    label token), scored over the label set; classifier: trained with cross-entropy over the
    label set at the end of the prompt, the LM head's rows of the labels' first tokens acting
    as the classification head (the labels must start with different tokens). Both give a
    LoRA adapter served and evaluated the same way."""
    class_weights: Literal["none", "balanced"] = "none"
    """Classification only. balanced: each training example's loss is weighted by
    n / (labels x examples of its label), so rare labels count as much as common ones (what
    macro-F1 rewards; the TF-IDF baseline is fit the same way). none: every example counts
    once (what accuracy rewards)."""
    recall_targets: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(
        default_factory=dict, max_length=16
    )
    """Classification only: labels whose misses cost more than false alarms, with the recall
    each must reach (e.g. {critical: 0.95, high: 0.9}). The evaluation fits a threshold per
    label on held-out rows (reporting cross-fitted figures next to argmax's), the version
    stores the rule, and the server decides with it: the first label listed whose
    probability reaches its threshold, else the most likely. Gates `basis: decision` read it."""

    @model_validator(mode="after")
    def _task_needs(self) -> TaskSpec:
        if self.type == "classification" and len(set(self.labels)) < 2:
            raise ValueError(
                "task.labels: classification needs at least 2 distinct labels; list them"
            )
        if self.type == "extraction" and self.output_schema is None:
            raise ValueError(
                "task.outputSchema: extraction needs a JSON Schema for its output; add one"
            )
        if not any(f in self.template for f in ("{text}", "{instruction}", "{input}")):
            raise ValueError(TEMPLATE_MESSAGE)
        if self.head == "classifier" and self.type != "classification":
            raise ValueError("task.head: classifier is only for type classification; use lm")
        if self.class_weights != "none" and self.type != "classification":
            raise ValueError(CLASS_WEIGHTS_MESSAGE)
        if self.recall_targets and self.type != "classification":
            raise ValueError(RECALL_TARGETS_MESSAGE)
        unknown = sorted(set(self.recall_targets) - set(self.labels))
        if unknown:
            raise ValueError(
                f"task.recallTargets: {unknown[0]!r} is not one of task.labels; name a label"
            )
        return self


# --------------------------------------------------------------------------- method


class MethodSpec(Spec):
    """How the weights are adapted."""

    type: Literal["lora", "qlora", "full", "continued-pretraining"] = "lora"
    """lora: low-rank adapters on a frozen base; qlora: the same on a 4-bit base (set
    baseModel.quantization: nf4); full: every weight; continued-pretraining: causal LM on raw
    text."""
    r: int = Field(16, ge=1, le=512)
    """LoRA rank."""
    alpha: int = Field(32, ge=1, le=4096)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA path."""
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list, max_length=64
    )
    """Module names to adapt; empty means every linear layer of the architecture's blocks."""


# --------------------------------------------------------------------------- hyperparameters


class Hyperparameters(Spec):
    """Optimisation settings. Unset values take method-aware defaults (see `resolved`)."""

    learning_rate: float | None = Field(None, gt=0.0, lt=1.0)
    """Peak learning rate; default 2e-4 for lora/qlora, 2e-5 for full and
    continued-pretraining."""
    epochs: int = Field(3, ge=1, le=1000)
    """Passes over the training data."""
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    """Stop after this many optimizer steps, whatever `epochs` says."""
    batch_size: int = Field(4, ge=1, le=4096)
    """Examples per device per forward pass."""
    gradient_accumulation: int = Field(4, ge=1, le=4096)
    """Forward passes per optimizer step (effective batch = batchSize x this x devices)."""
    max_seq_length: int = Field(512, ge=16, le=131072)
    """Longest example in tokens (prompt + target)."""
    warmup_ratio: Fraction = 0.03
    """Fraction of the steps spent warming the learning rate up."""
    weight_decay: float = Field(0.0, ge=0.0, lt=1.0)
    """AdamW weight decay."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate schedule after warmup."""
    seed: int = Field(42, ge=0, le=2**31 - 1)
    """Seed for sampling, splitting, initialisation and data order."""
    packing: bool = False
    """Pack several short examples into one sequence (generation tasks)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast precision; auto picks bf16 where the hardware supports it."""
    gradient_checkpointing: bool = False
    """Trade compute for memory on long sequences."""
    checkpoint_every_steps: int = Field(200, ge=1, le=1_000_000)
    """Save a resumable checkpoint to the output URI every N optimizer steps."""

    def resolved_learning_rate(self, method: str) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 2e-4 if method in ("lora", "qlora") else 2e-5


# --------------------------------------------------------------------------- resources


class DistributedSpec(Spec):
    """How several GPUs or nodes share the work."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """ddp: data parallel (accelerate); deepspeed: ZeRO sharding."""
    zero_stage: Literal[2, 3] = 2
    """DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also the weights."""
    offload: Literal["none", "cpu"] = "none"
    """DeepSpeed: offload optimizer state (and weights at stage 3) to CPU memory."""


class ResourcesSpec(Spec):
    """Compute for the training run."""

    gpus: int = Field(1, ge=0, le=16)
    """GPUs per node (nvidia.com/gpu); 0 trains on CPU."""
    nodes: int = Field(1, ge=1, le=64)
    """Nodes; more than one runs an Indexed Job with a rendezvous Service."""
    distributed: DistributedSpec | None = None
    """Required when gpus x nodes > 1."""

    @model_validator(mode="after")
    def _distribution(self) -> ResourcesSpec:
        if self.nodes > 1 and self.gpus < 1:
            raise ValueError("resources.gpus: nodes > 1 needs at least 1 GPU per node")
        if self.gpus * self.nodes > 1 and self.distributed is None:
            raise ValueError(
                "resources.distributed: gpus x nodes > 1 needs a distributed setting "
                "(strategy: ddp or deepspeed)"
            )
        return self


# --------------------------------------------------------------------------- evaluation

GateMetric = Literal[
    "accuracy",
    "macroF1",
    "weightedF1",
    "precision",
    "recall",
    "f1",
    "rocAuc",
    "expectedCalibrationError",
    "formatCompliance",
    "schemaCompliance",
    "fieldF1",
    "exactMatch",
    "referenceOverlapF1",
    "validationLoss",
    "consistency",
    "throughputPerSecond",
    "latencyP50Ms",
    "latencyP95Ms",
    "latencyP99Ms",
    "injectionFlipRate",
    "injectionSuccessRate",
    "canaryExposure",
]


class Gate(Spec):
    """One quality gate: a metric must be at least `min` and/or at most `max`."""

    metric: GateMetric
    """The metric, as named in the report."""
    class_name: str | None = Field(None, alias="class", max_length=128)
    """For precision, recall and f1: the label the gate applies to."""
    over_baseline: Literal["base", "fewShot", "tfidf", "previous"] | None = None
    """Compare the margin over this baseline instead of the raw value (previous: the stored
    version named by evaluation.previousVersion, e.g. "no worse than what is served")."""
    basis: Literal["heldOut", "verdicts", "decision"] = "heldOut"
    """What is judged: the held-out test set by argmax; the newest analysts' verdicts
    (dataset.feedback.holdOut; compared only with the previous version); or the held-out set
    decided by the task.recallTargets rule (cross-fitted; no baseline)."""
    min: float | None = None
    """Lowest acceptable value."""
    max: float | None = None
    """Highest acceptable value."""

    @model_validator(mode="after")
    def _bounds(self) -> Gate:
        if self.min is None and self.max is None:
            raise ValueError(f"evaluation.gates[{self.metric}]: set min, max or both")
        if self.metric in ("precision", "recall", "f1") and not self.class_name:
            raise ValueError(f"evaluation.gates[{self.metric}]: per-class metric needs class")
        if self.basis == "verdicts" and self.over_baseline not in (None, "previous"):
            raise ValueError(VERDICT_GATE_BASELINE_MESSAGE.format(metric=self.metric))
        if self.basis == "decision" and self.over_baseline is not None:
            raise ValueError(DECISION_GATE_MESSAGE)
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(
                f"evaluation.gates[{self.metric}]: min {self.min:g} is above max {self.max:g}, "
                "so the gate can never pass; swap or fix them"
            )
        return self

    @property
    def name(self) -> str:
        """How the gate is named in reports and conditions, e.g. recall[critical]>=0.95."""
        key = self.metric + (f"[{self.class_name}]" if self.class_name else "")
        if self.over_baseline:
            key += f"-over-{self.over_baseline}"
        if self.basis != "heldOut":
            key += f"@{self.basis}"
        bounds = []
        if self.min is not None:
            bounds.append(f">={self.min:g}")
        if self.max is not None:
            bounds.append(f"<={self.max:g}")
        return key + ",".join(bounds)


class PreviousVersion(Spec):
    """A stored version of this adapter to compare with: usually the one being served."""

    uri: Uri
    """A published version (…/versions/<run>, with sha256) or a job prefix (its current.json)."""
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    """sha256 of the version's manifest.json (required for a version URI)."""


class EvaluationSpec(Spec):
    """How the adapter is judged before anyone may promote it."""

    baseline: bool = True
    """Evaluate the base model (zero-shot) on the same held-out data and report the deltas."""
    injection_probes: bool = True
    """Run the prompt-injection suite against the tuned model."""
    memorization_probes: bool = True
    """Measure canary exposure and regurgitation (needs dataset.canaries.count > 0)."""
    probe_examples: int = Field(40, ge=1, le=10000)
    """Held-out examples the injection suite is planted into (each gets every attack)."""
    gates: list[Gate] = Field(default_factory=list, max_length=64)
    """Thresholds the job must meet to succeed."""
    previous_version: PreviousVersion | None = None
    """Score this stored version (verified, same base model) on the same held-out data: its
    metrics sit next to the tuned model's in the report as `previous`, and gates with
    `overBaseline: previous` compare with it. FineTuneSchedule runs get their schedule's last
    successful run here unless the template names one."""

    @model_validator(mode="after")
    def _previous_gates(self) -> EvaluationSpec:
        if self.previous_version is None and any(g.over_baseline == "previous" for g in self.gates):
            raise ValueError(PREVIOUS_GATE_MESSAGE)
        return self


# --------------------------------------------------------------------------- output


class OutputSpec(Spec):
    """Where the adapter, its lineage manifest and the report go."""

    uri: Uri | None = None
    """Prefix under which `<job name>/` is written; default for `sectune run` is
    file://./runs."""
    credentials: SecretReference | None = None
    """Secret with the storage keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
    AWS_ENDPOINT_URL, AWS_REGION)."""


# --------------------------------------------------------------------------- the job


class JobSpec(Spec):
    """Everything the trainer needs to produce and judge one adapter."""

    base_model: BaseModelSpec
    """The open model to start from."""
    dataset: DatasetSpec
    """Training and held-out data."""
    task: TaskSpec
    """What the model learns to do."""
    method: MethodSpec = Field(default_factory=MethodSpec)  # type: ignore[arg-type]
    """How the weights are adapted."""
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)  # type: ignore[arg-type]
    """Optimisation settings."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)  # type: ignore[arg-type]
    """Compute for the run."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)  # type: ignore[arg-type]
    """Evaluation and gates."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the artifacts go."""

    @model_validator(mode="after")
    def _method_needs(self) -> JobSpec:
        if self.method.type == "qlora" and self.base_model.quantization != "nf4":
            raise ValueError(
                "baseModel.quantization: method qlora trains on a 4-bit base; set quantization: nf4"
            )
        if self.method.type in ("full", "continued-pretraining") and (
            self.base_model.quantization != "none"
        ):
            raise ValueError(QUANTIZED_FULL_MESSAGE)
        if self.task.type == "classification" and any(
            g.metric == "formatCompliance" for g in self.evaluation.gates
        ):
            raise ValueError(FORMAT_GATE_MESSAGE)
        feedback = self.dataset.feedback
        if any(g.basis == "verdicts" for g in self.evaluation.gates) and (
            self.task.type != "classification" or feedback is None or not feedback.hold_out
        ):
            raise ValueError(VERDICT_GATE_MESSAGE)
        if (
            any(g.basis == "decision" for g in self.evaluation.gates)
            and not self.task.recall_targets
        ):
            raise ValueError(DECISION_GATE_MESSAGE)
        if self.task.type == "classification" and self.dataset.format not in (
            "classification",
            "instruction",
        ):
            raise ValueError(
                "dataset.format: classification tasks read classification (text, label) or "
                "instruction rows"
            )
        quality = self.dataset.quality
        if self.task.type != "classification" and (
            quality.max_label_errors is not None or quality.max_conflicting is not None
        ):
            raise ValueError(QUALITY_CLASSIFICATION_MESSAGE)
        if self.evaluation.previous_version and self.method.type not in ("lora", "qlora"):
            raise ValueError(
                "evaluation.previousVersion: only adapters (method lora or qlora) are compared "
                "with a previous version"
            )
        distributed = self.resources.distributed
        if distributed and distributed.strategy == "deepspeed":
            if self.base_model.quantization != "none":
                raise ValueError(DEEPSPEED_QUANTIZED_MESSAGE)
            if distributed.zero_stage == 3 and self.evaluation.previous_version:
                raise ValueError(ZERO3_PREVIOUS_MESSAGE)
            if (
                distributed.zero_stage == 3
                and self.evaluation.baseline
                and self.method.type not in ("lora", "qlora")
            ):
                raise ValueError(ZERO3_BASELINE_MESSAGE)
        return self


#: CEL rules the CRD carries, keyed by the model they sit on; each mirrors a validator above.
CLASS_WEIGHTS_MESSAGE = "task.classWeights is only for type classification; remove it"
DEEPSPEED_QUANTIZED_MESSAGE = (
    "resources.distributed.strategy: deepspeed with a quantized base (baseModel.quantization) "
    "is not implemented yet; use strategy: ddp for QLoRA on several GPUs"
)
ZERO3_PREVIOUS_MESSAGE = (
    "evaluation.previousVersion: comparing with a previous version at DeepSpeed zeroStage 3 is "
    "not implemented yet; use zeroStage 2"
)
ZERO3_BASELINE_MESSAGE = (
    "evaluation.baseline: the base-model baseline of full fine-tuning at DeepSpeed zeroStage 3 "
    "is not implemented yet; set baseline: false or use zeroStage 2"
)
QUALITY_AUDIT_MESSAGE = (
    "dataset.quality: limits (maxLabelErrors, maxLeakage, maxConflicting, enforceMinimums) "
    "need audit: true; turn the audit on or remove the limits"
)
QUALITY_CLASSIFICATION_MESSAGE = (
    "dataset.quality: maxLabelErrors and maxConflicting judge labels, so they are for task "
    "type classification only; remove them"
)
TEMPLATE_MESSAGE = (
    "task.template: names no field of the row ({text}, or {instruction} / {input}), so every "
    "example would get the same prompt; add {text} where the input goes"
)

# --------------------------------------------------------------------------- manifests


class ManifestError(ValueError):
    """A manifest that cannot run; the message names the file, the field and the fix."""


class JobManifest(BaseModel):
    """A FineTuneJob as `sectune run` sees it: a name and the job contract."""

    name: str
    spec: JobSpec
    ignored_fields: list[str] = Field(default_factory=list)


def _strip_cluster_only(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    spec = dict(spec)
    ignored = [f"spec.{k}" for k in sorted(CLUSTER_ONLY_FIELDS["spec"] & spec.keys())]
    for key in CLUSTER_ONLY_FIELDS["spec"]:
        spec.pop(key, None)
    if isinstance(spec.get("resources"), dict):
        resources = dict(spec["resources"])
        ignored += [
            f"spec.resources.{k}"
            for k in sorted(CLUSTER_ONLY_FIELDS["resources"] & resources.keys())
        ]
        for key in CLUSTER_ONLY_FIELDS["resources"]:
            resources.pop(key, None)
        spec["resources"] = resources
    return spec, ignored


def format_validation_error(
    error: ValidationError, source: str, what: str = "the FineTuneJob spec", root: str = "spec"
) -> str:
    """One line per problem: where it is (from `root`), what is wrong, the value given."""
    lines = [f"{source}: {what} is not valid:"]
    for problem in error.errors():
        where = ".".join(
            [root, *(str(p) for p in problem["loc"])] if root else [str(p) for p in problem["loc"]]
        )
        message = problem["msg"].removeprefix("Value error, ")
        value = problem.get("input")
        shown = "" if isinstance(value, dict | list) or value is None else f" (got {value!r})"
        lines.append(f"  {where or '(top level)'}: {message}{shown}")
    return "\n".join(lines)


def _relative_file(uri: Any, base_dir: Path) -> Any:
    if not isinstance(uri, str) or not uri.startswith("file://"):
        return uri
    path = uri.removeprefix("file://")
    if path.startswith(("/", "~", "$", "./")):
        return uri
    return f"file://{(base_dir / path).absolute()}"


def _resolve_relative_files(spec: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """file://data/train.jsonl in a manifest means data/train.jsonl next to the manifest."""
    spec = dict(spec)
    if isinstance(spec.get("dataset"), dict):
        dataset = dict(spec["dataset"])
        for key in ("train", "validation", "test"):
            dataset[key] = _relative_file(dataset.get(key), base_dir)
        spec["dataset"] = {k: v for k, v in dataset.items() if v is not None}
    if isinstance(spec.get("baseModel"), dict):
        spec["baseModel"] = {
            **spec["baseModel"],
            "uri": _relative_file(spec["baseModel"].get("uri"), base_dir),
        }
    return spec


def parse_manifest(
    document: Any, source: str = "manifest", base_dir: Path | None = None
) -> JobManifest:
    """Validate a FineTuneJob document (already parsed from YAML). With `base_dir`, relative
    file:// data and model URIs (file://data/x.jsonl, not file://./x) are taken from there."""
    if not isinstance(document, dict):
        raise ManifestError(
            f"{source}: expected a FineTuneJob mapping, got {type(document).__name__}"
        )
    kind = document.get("kind")
    if kind != FINETUNEJOB_KIND:
        raise ManifestError(f"{source}: kind is {kind!r}; sectune run takes kind: FineTuneJob")
    api_version = document.get("apiVersion")
    if api_version != f"{API_GROUP}/{API_VERSION}":
        raise ManifestError(
            f"{source}: apiVersion is {api_version!r}; use {API_GROUP}/{API_VERSION}"
        )
    name = (document.get("metadata") or {}).get("name")
    if (
        not isinstance(name, str)
        or not re.fullmatch(JOB_NAME_PATTERN, name)
        or len(name) > MAX_JOB_NAME
    ):
        raise ManifestError(
            f"{source}: metadata.name {str(name)[:80]!r}: at most {MAX_JOB_NAME} characters, "
            "lowercase letters, digits and '-', starting with a letter (the training Job, its "
            "Service and pod hostnames are named after it)"
        )
    raw_spec = document.get("spec")
    if not isinstance(raw_spec, dict):
        raise ManifestError(f"{source}: spec is missing; see examples/ for a starting point")
    spec, ignored = _strip_cluster_only(raw_spec)
    if base_dir is not None:
        spec = _resolve_relative_files(spec, base_dir)
    try:
        job = JobSpec.model_validate(spec)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, source)) from None
    return JobManifest(name=name, spec=job, ignored_fields=ignored)


def load_manifest(path: str | Path) -> JobManifest:
    """Read and validate a FineTuneJob manifest file (YAML)."""
    from sectune.yamlio import YAMLError, load_yaml

    path = Path(path)
    try:
        document = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    return parse_manifest(document, str(path), base_dir=path.parent)
