"""What a server serves: the base model and, per adapter name, the versions and their traffic.

This is the file the operator renders into an AdapterDeployment's ConfigMap (with each
`fineTuneJob` source resolved to its version URI and digest), and what `sectune serve --config`
reads on a laptop. The server re-reads it when it changes and swaps adapters without a restart.

    apiVersion: sectune.io/v1alpha1
    kind: ServingConfig
    baseModel: {uri: file:///models/SmolLM2-135M-Instruct}   # optional: else the adapters' own
    adapters:
    - name: attack-tactics
      versions:
      - version: v1
        uri: s3://bucket/jobs/attack-tactics/versions/20261123T101500Z-1a2b3c
        sha256: 5d0c...                                        # of that version's manifest.json
        traffic: 90
      - version: v2
        uri: s3://bucket/jobs/attack-tactics                   # a job prefix: its current.json
        traffic: 10
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from sectune.config import (
    API_GROUP,
    API_VERSION,
    DNS_LABEL_PATTERN,
    SHA256_PATTERN,
    BaseModelSpec,
    ManifestError,
    Spec,
    Uri,
    format_validation_error,
)

VLLM_ARGS = "vllm.yaml"
"""The vLLM arguments file `sectune fetch-adapters` writes next to the adapters it verified
(read by `vllm serve --config`)."""
BASE_MODEL_NAME = "base"
"""The `model` a client asks for to get the base model without an adapter."""


def check_versions(adapter: str, versions: list[tuple[str, int]]) -> None:
    """An adapter's versions: unique names, traffic adding up to 100 (raises ValueError)."""
    total = sum(traffic for _, traffic in versions)
    if total != 100:
        raise ValueError(f"adapters[{adapter}].versions: traffic adds up to {total}; make it 100")
    names = [name for name, _ in versions]
    if len(set(names)) != len(names):
        raise ValueError(f"adapters[{adapter}].versions: version names must be unique")


def check_adapter_names(names: list[str]) -> None:
    """Adapter names: unique, and not the base model's (raises ValueError)."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"adapters: names must be unique; repeated: {', '.join(repeated)}")
    if BASE_MODEL_NAME in names:
        raise ValueError(f"adapters: {BASE_MODEL_NAME!r} is reserved for the base model")


# --------------------------------------------------------------------------- the adapter set
# One model of "an adapter, its versions and their traffic", shared by the server's config
# (a version is a URI and digest) and the AdapterDeployment's spec (a version is a source to
# resolve): the names, traffic and their rules are defined here once.


class VersionShare(Spec):
    """One version of an adapter and its share of the adapter's traffic."""

    version: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    """Version name (DNS label), e.g. v3."""
    traffic: int = Field(100, ge=0, le=100)
    """Percent of the adapter's requests this version answers."""
    shadow: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the adapter's unpinned /v1/classify requests this version also scores in
    the background, its answer never returned: its agreement with the answer given, and its
    live quality on the verdicts analysts post for those requests, are measured before any
    user sees it. Only for a version with traffic 0."""

    @model_validator(mode="after")
    def _shadow_answers_nobody(self) -> VersionShare:
        if self.shadow > 0 and self.traffic > 0:
            raise ValueError(
                f"versions[{self.version}].shadow: a shadow answers nobody; set its traffic to 0"
            )
        return self


class AdapterVersions(Spec):
    """An adapter offered under `name` (the `model` field of a request) with its versions."""

    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    """Name clients ask for; a DNS label, unique in the deployment."""
    versions: Sequence[VersionShare]

    @model_validator(mode="after")
    def _traffic(self) -> AdapterVersions:
        check_versions(self.name, [(v.version, v.traffic) for v in self.versions])
        return self


class ServedVersion(VersionShare):
    """One adapter version as a server loads it: where it is and its digest. Clients may pin
    it as `model: name@version`; `traffic` is its share of the unpinned requests."""

    uri: Uri
    """A published version (…/versions/<run>) or a job prefix, whose current.json is followed."""
    sha256: str | None = Field(None, pattern=SHA256_PATTERN)
    """sha256 of the version's manifest.json. Required for a version URI; for a job prefix the
    digest recorded in current.json (written only when the job's gates passed) is used."""


class ServedAdapter(AdapterVersions):
    """An adapter as a server offers it."""

    versions: list[ServedVersion] = Field(min_length=1, max_length=8)
    """Versions served side by side (a canary); traffic adds up to 100."""


class DriftSettings(Spec):
    """Drift of what is served against what the adapter was trained and evaluated on: the
    predicted-label mix (classification) and the prompt-length mix (every task type)."""

    enabled: bool = True
    """Compute drift scores per adapter version."""
    window_minutes: int = Field(60, ge=1, le=10080)
    """Sliding window of requests the score is computed over."""
    min_requests: int = Field(20, ge=1, le=1_000_000)
    """Fewer requests than this in the window report no score."""
    threshold: float = Field(0.2, ge=0.0, le=1.0)
    """Score above which drift alerts fire (exported as sectune_serve_drift_threshold)."""


class FeedbackSettings(Spec):
    """Analysts' verdicts on served predictions (`POST /v1/feedback`): where they are kept,
    how long a prediction can be judged, and when live quality alerts."""

    store: Uri | None = None
    """Prefix the verdicts are written to (s3://… or file://…), sanitized, as JSONL in the
    training format, with the storage credentials the servers already have. Unset: responses
    still carry ids, and /v1/feedback answers that this server keeps no verdicts."""
    window_minutes: int = Field(1440, ge=1, le=43200)
    """How long after a prediction a verdict on it is taken; later ones get 404."""
    max_predictions: int = Field(50_000, ge=100, le=1_000_000)
    """Predictions held for joining (their inputs are in memory until the window ends); the
    oldest go first when more arrive."""
    batch_size: int = Field(100, ge=1, le=10_000)
    """Verdicts written as one object at most."""
    flush_seconds: float = Field(0.25, ge=0.05, le=60.0)
    """Longest a verdict waits for its batch to be written. A verdict is acknowledged only
    once its batch is stored, so this bounds /v1/feedback's latency."""
    min_verdicts: int = Field(50, ge=1, le=1_000_000)
    """Verdicts a version needs in the live-quality window before its live macro-F1 is judged
    (exported as sectune_serve_feedback_min_verdicts)."""
    max_drop: float = Field(0.1, ge=0.0, le=1.0)
    """Live macro-F1 this far below the version's offline macro-F1 fires
    SectuneLiveQualityDropped (exported as sectune_serve_feedback_max_drop)."""


class ServingConfig(Spec):
    """The server's configuration file."""

    api_version: str = f"{API_GROUP}/{API_VERSION}"
    kind: Literal["ServingConfig"] = "ServingConfig"
    base_model: BaseModelSpec | None = None
    """The base model. Omitted: the one the adapters' manifests name (they must agree)."""
    adapters: list[ServedAdapter] = Field(min_length=1, max_length=64)
    """Adapters offered; names are unique."""
    drift: DriftSettings = Field(default_factory=DriftSettings)  # type: ignore[arg-type]
    """Drift monitoring."""
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)  # type: ignore[arg-type]
    """Analysts' verdicts and live quality."""
    require_passed_gates: bool = True
    """Refuse a version whose manifest says its evaluation gates failed (load-failure reason
    gates-failed). False serves it anyway: for comparing a failed run by hand."""

    @model_validator(mode="after")
    def _unique(self) -> ServingConfig:
        check_adapter_names([a.name for a in self.adapters])
        return self


def parse_serving_config(document: Any, source: str) -> ServingConfig:
    """Validate a parsed document; the error names the file and each bad field."""
    if not isinstance(document, dict):
        raise ManifestError(f"{source}: expected a ServingConfig mapping")
    try:
        return ServingConfig.model_validate(document)
    except ValidationError as exc:
        message = format_validation_error(exc, source, "the serving config", root="")
        raise ManifestError(message) from None


def load_serving_config(path: Path) -> ServingConfig:
    """Read a ServingConfig from YAML or JSON."""
    from sectune.yamlio import load_yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read the serving config: {exc.strerror}") from None
    try:
        document = load_yaml(text)
    except Exception as exc:  # ruamel raises several parser error types
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    return parse_serving_config(document, str(path))


def config_from_flags(
    adapters: list[str], base_model: str | None, feedback_store: str | None = None
) -> ServingConfig:
    """`sectune serve --adapter name=URI …`: one version per adapter, named "current" (it
    follows the job's current.json), with all the traffic; verdicts kept under
    `--feedback-store` when given."""
    entries = []
    for item in adapters:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ManifestError(
                f"--adapter {item!r}: expected name=URI (e.g. triage=file://out/triage)"
            )
        entries.append({"name": name, "versions": [{"version": "current", "uri": uri}]})
    document: dict[str, Any] = {"adapters": entries}
    if base_model:
        document["baseModel"] = {"uri": base_model}
    if feedback_store:
        document["feedback"] = {"store": feedback_store}
    return parse_serving_config(document, "command line")
