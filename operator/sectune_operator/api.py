"""The custom resources: the job contract from `sectune.config` plus what only Kubernetes needs.

`crd.py` turns these models into `crds/*.yaml`; handlers parse specs with them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, model_validator

from sectune.config import (
    DNS_LABEL_PATTERN,
    PREVIOUS_GATE_MESSAGE,
    SHA256_PATTERN,
    BaseModelSpec,
    EvaluationSpec,
    JobSpec,
    ResourcesSpec,
    SecretReference,
    Spec,
    Uri,
)
from sectune.contract import DataQuality, ResultAdapter, ResultGate
from sectune.serving.config import (
    AdapterVersions,
    DriftSettings,
    FeedbackSettings,
    VersionShare,
    check_adapter_names,
)

Quantity = Annotated[
    str,
    Field(
        max_length=64,
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$",
    ),
]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=64)]


class Toleration(Spec):
    """A taint the pod tolerates (GPU pools are often tainted)."""

    key: str | None = Field(None, max_length=316)
    """Taint key; empty with operator Exists tolerates everything."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""
    value: str | None = Field(None, max_length=63)
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: int | None = Field(None, ge=0)
    """For NoExecute: how long the pod stays after the taint appears."""


class Placement(Spec):
    """Where the operator's pods are scheduled (GPU pools are often labelled and tainted)."""

    node_selector: LabelMap = Field(default_factory=dict)
    """Labels a node must have (e.g. nvidia.com/gpu.product)."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Taints the pods tolerate."""
    priority_class_name: str | None = Field(None, max_length=253)
    """PriorityClass of the pods (a preempted training pod is retried and resumes)."""


class ClusterResources(ResourcesSpec, Placement):
    """Compute for the run, with where and how it is scheduled."""

    cpu: Quantity | None = None
    """CPU request and limit of each training pod (default: the operator's setting)."""
    memory: Quantity | None = None
    """Memory request and limit of each training pod."""
    shared_memory: Quantity = "8Gi"
    """Size of /dev/shm (NCCL and data loaders need more than the container default)."""


class FineTuneJobSpec(JobSpec):
    """A fine-tuning run: the job contract plus how it runs on the cluster."""

    resources: ClusterResources = Field(default_factory=ClusterResources)  # type: ignore[arg-type]
    """Compute for the run and where it is scheduled."""
    image: str | None = Field(None, max_length=512)
    """Trainer image (default: the operator's setting)."""
    image_pull_secrets: list[SecretReference] = Field(default_factory=list, max_length=8)
    """Secrets for pulling the trainer image."""
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_LABEL_PATTERN)
    """ServiceAccount of the training pods (default: the namespace's default)."""
    hf_token_secret: SecretReference | None = None
    """Secret with HF_TOKEN for hf:// base models that need one."""
    cleanup_policy: Literal["Retain", "Delete"] = "Retain"
    """Delete also removes the job's artifacts from storage (through a finalizer)."""
    queue_name: str | None = Field(None, max_length=253)
    """Kueue LocalQueue; the Job is created suspended and Kueue admits it."""
    suspend: bool = False
    """Stop the training (checkpoint kept) and resume it later by setting false."""
    active_deadline_seconds: int = Field(172_800, ge=60, le=2_592_000)
    """Longest the training Job may run, in seconds (default 48 h)."""
    backoff_limit: int = Field(3, ge=0, le=100)
    """Infrastructure failures retried before the job fails (preemptions are not counted)."""


# --------------------------------------------------------------------------- FineTuneJob status


class Condition(Spec):
    """The Kubernetes condition shape."""

    type: str = Field(max_length=316)
    """Condition type: Ready, Training, Evaluated, GatesPassed, Succeeded, Failed."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field("", max_length=1024)
    """CamelCase reason for the last transition."""
    message: str = Field("", max_length=32768)
    """What happened and, on failure, what to do."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """The spec generation the condition was computed from."""


class Progress(Spec):
    """Live training progress, read from the trainer's metrics endpoint."""

    step: int | None = None
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps planned."""
    percent: int | None = None
    """Steps done, in percent."""
    loss: float | None = None
    """Training loss of the latest step."""
    tokens_per_second: float | None = None
    """Training throughput."""
    eta_seconds: int | None = None
    """Estimated seconds to the end of training."""
    display: str | None = Field(default=None, max_length=64)
    """Progress as shown by kubectl (step/total)."""


class DatasetStatus(Spec):
    """What the data stage saw."""

    digest: str | None = None
    """sha256 over the data files."""
    train_examples: int | None = None
    """Training examples after validation, sanitization and deduplication."""
    validation_examples: int | None = None
    """Held-out examples."""
    skipped: int | None = None
    """Invalid rows skipped (dataset.onInvalid: skip)."""
    redactions: dict[str, int] = Field(default_factory=dict)
    """Values redacted, per entity type."""
    quality: DataQuality | None = None
    """What the data audit found (dataset.quality), in counts."""


class FineTuneJobStatus(Spec):
    """Observed state of a FineTuneJob."""

    phase: (
        Literal["Pending", "Preparing", "Training", "Evaluating", "Succeeded", "Failed"] | None
    ) = None
    """Pending, Preparing (data, model), Training (steps reported), Evaluating (every step
    done, evaluation and publishing running), Succeeded or Failed."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions in the Kubernetes shape."""
    progress: Progress | None = None
    """Live training progress."""
    dataset: DatasetStatus | None = None
    """What the data stage saw."""
    adapter: ResultAdapter | None = None
    """The stored adapter."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Headline evaluation figures of the tuned model."""
    gates: list[ResultGate] = Field(default_factory=list)
    """Each gate and whether it passed."""
    gates_summary: str | None = None
    """Gates as shown by kubectl (passed/total)."""
    start_time: str | None = None
    """When the training Job was created."""
    completion_time: str | None = None
    """When the job finished."""
    attempts: int | None = None
    """Training pods started (retries after preemption included)."""
    pod: str | None = None
    """The latest training pod (for kubectl logs)."""


# --------------------------------------------------------------------------- AdapterDeployment


class AdapterSource(Spec):
    """Where an adapter version comes from: a FineTuneJob in this namespace, or a URI + digest."""

    fine_tune_job: str | None = Field(None, max_length=63, pattern=DNS_LABEL_PATTERN)
    """Name of a Succeeded FineTuneJob; its adapter URI and digest are taken from its status."""
    uri: Uri | None = None
    """Adapter directory in storage."""
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    """Digest of the adapter's manifest.json, verified before the adapter is served."""

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSource:
        if (self.fine_tune_job is None) == (self.uri is None):
            raise ValueError("source: set exactly one of fineTuneJob or uri")
        if self.uri is not None and self.sha256 is None:
            raise ValueError("source.sha256: an adapter given by uri needs its sha256")
        return self


class AdapterVersion(VersionShare):
    """One version of an adapter and its share of the adapter's traffic."""

    source: AdapterSource
    """Where this version comes from."""


class AdapterSpec(AdapterVersions):
    """An adapter the server offers under `name` (the `model` field of a request)."""

    versions: list[AdapterVersion] = Field(min_length=1, max_length=8)
    """Versions served side by side (canary); their traffic adds up to 100."""


class RollbackSpec(Spec):
    """When a canary version is rolled back automatically: the operator asks Prometheus for each
    canary version's figures over the window and, when one exceeds its bound, routes the
    adapter's traffic to the stable version until the spec changes."""

    window_minutes: int = Field(5, ge=1, le=1440)
    """Window the canary's error rate, p95 latency and drift are measured over."""
    min_requests: int = Field(20, ge=1, le=1_000_000)
    """Fewer canary requests than this in the window give no verdict."""
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)
    """Highest fraction of failed requests."""
    max_latency_p95_ms: int = Field(2000, ge=1)
    """Highest p95 latency in milliseconds."""
    max_drift: float = Field(0.3, ge=0.0, le=1.0)
    """Highest drift score (predicted labels or prompt lengths) against the training-time
    reference."""
    outcome_window_minutes: int = Field(1440, ge=5, le=43200)
    """Window analysts' verdicts (feedback.store) on the canary and the stable version are
    compared over."""
    min_verdicts: int = Field(30, ge=1, le=1_000_000)
    """Fewer verdicts than this on either version in the outcome window: no outcome verdict."""
    max_macro_f1_drop: float = Field(0.05, ge=0.0, le=1.0)
    """Roll back when the canary's live macro-F1 is more than this below the stable version's
    and a bootstrap finds it worse in at least 95 % of resamples."""


class PromotionSpec(Spec):
    """Rules for putting versions into service."""

    require_passed_gates: bool = True
    """Serve only adapter versions whose evaluation passed every gate: the operator does not
    render a FineTuneJob whose gates failed, and the servers refuse a stored version whose
    manifest says its gates failed."""
    rollback: RollbackSpec = Field(default_factory=RollbackSpec)  # type: ignore[arg-type]
    """Automatic rollback thresholds."""


class ServingResources(Placement):
    """Compute for each server replica, and where replicas are scheduled."""

    gpus: int = Field(0, ge=0, le=8)
    """GPUs per replica."""
    cpu: Quantity | None = None
    """CPU request and limit."""
    memory: Quantity | None = None
    """Memory request and limit."""


class AdapterDeploymentSpec(Spec):
    """A base model served with many adapters, hot-swapped from storage."""

    base_model: BaseModelSpec
    """The base model every adapter applies to."""
    adapters: list[AdapterSpec] = Field(
        min_length=1, max_length=64, json_schema_extra={"x-list-map-keys": ["name"]}
    )
    """Adapters offered; names are unique."""
    replicas: int = Field(1, ge=0, le=100)
    """Server replicas."""
    resources: ServingResources = Field(default_factory=ServingResources)  # type: ignore[arg-type]
    """Compute per replica."""
    runtime: Literal["sectune", "vllm"] = "sectune"
    """sectune: the built-in multi-adapter server; vllm: vLLM for GPU fleets."""
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    """Promotion and rollback rules."""
    drift: DriftSettings = Field(default_factory=DriftSettings)  # type: ignore[arg-type]
    """Drift monitoring."""
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)  # type: ignore[arg-type]
    """Analysts' verdicts (POST /v1/feedback), stored with `credentials` (which must allow
    writing under `feedback.store`), and the live-quality alert's bounds."""
    auth_secret: SecretReference | None = None
    """Secret with the API keys clients must present (key `api-keys`: one
    `<key-id> <key> [adapter,…]` per line). Unset: the API answers without keys."""
    credentials: SecretReference | None = None
    """Secret with the storage keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional
    AWS_ENDPOINT_URL, AWS_REGION) the servers read the base model and adapters with."""
    image: str | None = Field(None, max_length=512)
    """Server image (default: the operator's setting)."""
    image_pull_secrets: list[SecretReference] = Field(default_factory=list, max_length=8)
    """Secrets for pulling the server image."""

    @model_validator(mode="after")
    def _unique_names(self) -> AdapterDeploymentSpec:
        check_adapter_names([a.name for a in self.adapters])
        shadowed = [a.name for a in self.adapters if any(v.shadow for v in a.versions)]
        if shadowed and self.runtime == "vllm":
            raise ValueError(
                f"adapters[{shadowed[0]}].versions[].shadow: not implemented yet for runtime "
                "vllm; use runtime sectune, or set shadow to 0"
            )
        if self.feedback.store is not None and self.runtime == "vllm":
            raise ValueError(
                "feedback.store: not implemented yet for runtime vllm (it has no /v1/feedback); "
                "use runtime sectune, or unset feedback.store"
            )
        return self


class ActiveAdapter(Spec):
    """An adapter version the server has loaded and verified."""

    name: str
    """Adapter name."""
    version: str
    """Version name."""
    uri: str | None = None
    """Where it was loaded from."""
    sha256: str | None = None
    """Verified digest of its manifest.json."""
    traffic: int | None = None
    """Percent of the adapter's requests it answers."""
    shadow: float | None = None
    """A shadow: the fraction of the adapter's classify requests it also scores, unseen."""
    shadow_agreement: float | None = None
    """A shadow: the share of its answers agreeing with the answer the client got (every
    replica, since it loaded). Its live quality on analysts' verdicts is on the dashboard."""


class Revision(Spec):
    """One rendered adapter set, kept for audit."""

    revision: int
    """The counter value."""
    adapters: str = Field(max_length=4096)
    """What was rendered, e.g. "alert-triage v1 90%, v2 10%; attack-tactics v1 100%"."""
    config_sha256: str
    """sha256 of the rendered ServingConfig."""
    time: str
    """When it was rendered (RFC 3339)."""
    reason: str = Field("", max_length=1024)
    """Why: the spec changed, a FineTuneJob finished, a canary was rolled back."""


class RolledBack(Spec):
    """A canary version the operator took out of traffic."""

    adapter: str
    """Adapter name."""
    version: str
    """The canary version."""
    metric: str
    """The figure that exceeded its bound: errorRate, latencyP95Ms, drift, or liveMacroF1Drop
    (analysts' verdicts: how far the canary's live macro-F1 fell below the stable version's)."""
    value: float
    """What Prometheus measured over the window."""
    threshold: float
    """The bound from spec.promotion.rollback."""
    generation: int
    """The spec generation it holds for: a new generation clears it."""
    time: str
    """When the rollback happened (RFC 3339)."""


ServingPhase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]


class AdapterDeploymentStatus(Spec):
    """Observed state of an AdapterDeployment."""

    phase: ServingPhase | None = None
    """Pending, Progressing, Ready, Degraded or Failed."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """Conditions in the Kubernetes shape."""
    ready_replicas: int | None = None
    """Server replicas that are ready."""
    ready: str | None = None
    """Ready replicas as shown by kubectl (ready/desired)."""
    adapter_count: int | None = None
    """Adapters offered."""
    active_adapters: list[ActiveAdapter] = Field(default_factory=list)
    """Adapter versions loaded and verified."""
    revision: int | None = None
    """Counter of distinct adapter sets rendered for the servers."""
    history: list[Revision] = Field(default_factory=list, max_length=10)
    """The latest rendered adapter sets, newest last."""
    rolled_back: list[RolledBack] = Field(default_factory=list)
    """Canary versions out of traffic until the spec's generation changes."""
    endpoint: str | None = None
    """In-cluster URL of the OpenAI-compatible API."""


# --------------------------------------------------------------------------- FineTuneSchedule


class DriftTrigger(Spec):
    """Start a run when a served version's drift stays above a threshold."""

    adapter_deployment: str = Field(max_length=57, pattern=DNS_LABEL_PATTERN)
    """The AdapterDeployment (in this namespace) serving the adapter."""
    adapter: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    """The adapter whose drift is watched."""
    score: Literal["labels", "inputs", "any"] = "any"
    """labels: predicted-label drift (classification); inputs: prompt-length drift; any: either."""
    threshold: float = Field(0.3, ge=0.0, le=1.0)
    """Drift score above which a run starts."""
    for_minutes: int = Field(60, ge=1, le=10080)
    """How long the score must stay above the threshold; also the quiet time after a trigger."""


class QualityTrigger(Spec):
    """Start a run when analysts' verdicts say the served adapter got worse: its live macro-F1
    over a day (the chart's `sectune:serve_live_macro_f1:1d` recording rule, from
    `POST /v1/feedback`) stays below a bound."""

    adapter_deployment: str = Field(max_length=57, pattern=DNS_LABEL_PATTERN)
    """The AdapterDeployment (in this namespace) serving the adapter, with a feedback.store."""
    adapter: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    """The adapter whose verdicts are watched (its lowest-scoring version in traffic with
    enough of them)."""
    min_macro_f1: float = Field(ge=0.0, le=1.0)
    """Live macro-F1 below which a run starts."""
    min_verdicts: int = Field(50, ge=1, le=1_000_000)
    """Verdicts a version needs in the day before its live macro-F1 counts."""
    for_minutes: int = Field(60, ge=1, le=10080)
    """How long it must stay below the bound; also the quiet time after a trigger."""


class SchedulePromotion(Spec):
    """Add a run whose gates passed to an AdapterDeployment as a canary (without GitOps)."""

    adapter_deployment: str = Field(max_length=57, pattern=DNS_LABEL_PATTERN)
    """The AdapterDeployment (in this namespace) to add the version to."""
    adapter: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    """The adapter the version is added to."""
    canary_percent: int = Field(10, ge=1, le=99)
    """Traffic the new version starts with; canary analysis then decides."""


PREVIOUS_TEMPLATE_MESSAGE = (
    "jobTemplate.evaluation.gates: overBaseline: previous compares adapters; method must be "
    "lora or qlora"
)


class TemplateEvaluation(EvaluationSpec):
    """A schedule template's evaluation: gates with `overBaseline: previous` need no
    `previousVersion` here, because each run is given what it would replace: the version the
    schedule's AdapterDeployment (promote, else its trigger's) serves to most of the adapter's
    traffic, else the schedule's last successful run (with neither, a run goes without those
    gates and its annotation says so)."""

    CEL_WAIVED: ClassVar[tuple[str, ...]] = (PREVIOUS_GATE_MESSAGE,)

    @model_validator(mode="after")
    def _previous_gates(self) -> TemplateEvaluation:  # waives EvaluationSpec's rule
        return self


class FineTuneJobTemplate(FineTuneJobSpec):
    """The FineTuneJob spec a schedule creates its runs from."""

    evaluation: TemplateEvaluation = Field(default_factory=TemplateEvaluation)  # type: ignore[arg-type]
    """Evaluation and gates; `overBaseline: previous` compares with the served version (or
    the schedule's last successful run)."""

    @model_validator(mode="after")
    def _previous_needs_an_adapter(self) -> FineTuneJobTemplate:
        previous = any(g.over_baseline == "previous" for g in self.evaluation.gates)
        if previous and self.method.type not in ("lora", "qlora"):
            raise ValueError(PREVIOUS_TEMPLATE_MESSAGE)
        return self


class FineTuneScheduleSpec(Spec):
    """Retraining on a cadence or on drift: what CronJob is to Job, for FineTuneJobs."""

    schedule: str | None = Field(None, max_length=128)
    """Cron expression (5 fields), e.g. "0 3 1 * *" (monthly). Optional with a drift trigger."""
    time_zone: str = Field("UTC", max_length=64)
    """IANA time zone the schedule is read in."""
    job_template: FineTuneJobTemplate
    """The FineTuneJob spec of every run."""
    concurrency_policy: Literal["Forbid", "Replace"] = "Forbid"
    """Forbid: skip a run while the previous one is unfinished; Replace: delete it first."""
    successful_jobs_history_limit: int = Field(3, ge=0, le=100)
    """Succeeded runs kept (their adapters stay in storage either way)."""
    failed_jobs_history_limit: int = Field(1, ge=0, le=100)
    """Failed runs kept for inspection."""
    suspend: bool = False
    """No run starts while true."""
    drift_trigger: DriftTrigger | None = None
    """Start a run when the served version drifts (needs the operator's Prometheus URL)."""
    quality_trigger: QualityTrigger | None = None
    """Start a run when analysts' verdicts put the served version's live macro-F1 below a
    bound (needs the operator's Prometheus URL and the chart's recording rules there)."""
    promote: SchedulePromotion | None = None
    """Add each run whose gates passed to an AdapterDeployment as a canary. Off by default:
    GitOps users run `sectune promote` instead."""

    @model_validator(mode="after")
    def _when(self) -> FineTuneScheduleSpec:
        if self.schedule is None and self.drift_trigger is None and self.quality_trigger is None:
            raise ValueError("set schedule, driftTrigger, qualityTrigger, or more than one")
        if self.schedule is not None:
            from cronsim import CronSim, CronSimError

            try:
                CronSim(self.schedule, dt.datetime.now())
            except CronSimError as exc:
                raise ValueError(f"schedule {self.schedule!r}: {exc}") from None
        try:
            ZoneInfo(self.time_zone)
        except (ValueError, KeyError, ZoneInfoNotFoundError):
            raise ValueError(f"timeZone {self.time_zone!r}: not an IANA time zone") from None
        return self


class LastRun(Spec):
    """The latest run that succeeded."""

    name: str
    """FineTuneJob name."""
    adapter: ResultAdapter | None = None
    """Its stored adapter (uri, sha256)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Its headline evaluation figures."""


class FineTuneScheduleStatus(Spec):
    """Observed state of a FineTuneSchedule."""

    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready (False while suspended or invalid)."""
    active: list[str] = Field(default_factory=list)
    """Runs not finished yet."""
    last_schedule_time: str | None = None
    """The scheduled time of the latest cron run (RFC 3339)."""
    next_schedule_time: str | None = None
    """When the next cron run is due."""
    last_trigger_time: str | None = None
    """When drift or live quality last started a run."""
    last_successful_job: LastRun | None = None
    """The latest run that succeeded, with its adapter and metrics."""
    last_promoted_job: str | None = None
    """The latest run added to an AdapterDeployment by `promote`."""


def spec_models() -> dict[str, type[BaseModel]]:
    """The spec and status model of each kind."""
    return {
        "FineTuneJob.spec": FineTuneJobSpec,
        "FineTuneJob.status": FineTuneJobStatus,
        "AdapterDeployment.spec": AdapterDeploymentSpec,
        "AdapterDeployment.status": AdapterDeploymentStatus,
        "FineTuneSchedule.spec": FineTuneScheduleSpec,
        "FineTuneSchedule.status": FineTuneScheduleStatus,
    }
