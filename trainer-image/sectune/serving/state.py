"""What a running server holds: its options, the base model and engine, the adapter registry,
the config watcher and the API keys; and how it starts (the base model resolved, loaded, the
adapters applied)."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sectune import artifacts
from sectune.config import BaseModelSpec, ManifestError
from sectune.serving.admission import Admission
from sectune.serving.auth import KeysFile, load_token
from sectune.serving.config import FeedbackSettings, ServingConfig
from sectune.serving.engine import Engine
from sectune.serving.feedback import FeedbackWriter, PredictionLog
from sectune.serving.metrics import ServingMetrics
from sectune.serving.peers import Peers
from sectune.serving.registry import Registry
from sectune.serving.watch import ConfigWatcher

log = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    config_path: Path | None
    config: ServingConfig
    api_keys_file: Path | None = None
    metrics_token_file: Path | None = None
    """A file holding the token /metrics requires (Authorization: Bearer); None: /metrics
    is open to whoever reaches the port."""
    precision: str = "auto"
    """auto: 16-bit weights on GPUs and CPUs with native bf16, float32 elsewhere
    (sectune.placement); bf16: bfloat16 weights; autocast: float32 weights with bfloat16
    autocast (the numerics of training-time evaluation); fp32: float32 throughout."""
    max_batch: int = 16
    max_wait_ms: float = 5.0
    reload_interval: float = 1.0
    max_in_flight: int = 64
    """Inference requests accepted at once (queued or running); more get 429 + Retry-After."""
    max_in_flight_per_key: int = 16
    """Inference requests one API key may have in flight (a key's `concurrency=` overrides)."""
    request_timeout: float = 120.0
    """Seconds a request may take in all; after that it is dropped and answered 504."""
    max_queue_seconds: float = 30.0
    """Seconds a request may wait for the model before it is refused with 503 + Retry-After."""
    max_batch_tokens: int = 16_384
    """Padded tokens (rows × longest row) in one forward pass."""
    prefix_cache: bool = True
    """Classify batches start after the cached keys and values of the tokens an adapter's
    prompts share (sectune.evaluation.prefix); off: every prompt runs whole."""
    max_adapter_bytes: int = field(default_factory=lambda: artifacts.MAX_ARTIFACT_BYTES)
    """Cap on what one adapter version may download."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host headers answered; empty: loopback names when listening on loopback, else any."""
    peers: Peers | None = None
    """The other replicas, to which a verdict on an answer this one did not give is passed."""
    max_connections: int = 256
    """Open connections at once; more get 503."""
    read_timeout: float = 10.0
    """Seconds a client has to send a whole request (headers and body) once it starts."""


@dataclass
class ServerState:
    options: ServerOptions
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    engine: Engine | None = None
    registry: Registry | None = None
    base_uri: str = ""
    loading: str = "starting"
    """What the server is doing before it is ready; empty once loaded."""
    fatal: str | None = None
    admission: Admission = field(init=False)
    """Requests in flight, per key and in all, and each key's rate (on the event loop)."""
    keys: KeysFile | None = None
    """The keys file (--api-keys-file); None: the API answers without keys."""
    metrics_token: bytes | None = None
    watcher: ConfigWatcher | None = None
    predictions: PredictionLog | None = None
    """Answers held for joining analysts' verdicts (None: no feedback store configured)."""
    feedback: FeedbackWriter | None = None
    feedback_settings: FeedbackSettings | None = None

    def __post_init__(self) -> None:
        self.admission = Admission(self.options.max_in_flight, self.options.max_in_flight_per_key)

    # -------------------------------------------------------------- startup

    def load(self) -> None:
        """Resolve the base model, load it, start the worker, apply the config."""
        from sectune import placement
        from sectune.training import base_model

        config = self.options.config
        spec = config.base_model
        if spec is None:
            self.loading = "reading the adapters' manifests to find their base model"
            spec = self._base_from_manifests(config)
        self.base_uri = spec.uri
        self.loading = f"loading base model {spec.uri}"
        resolved = base_model.resolve(spec)
        numerics = placement.for_serving(self.options.precision)
        log.info("computing on %s", numerics.describe())
        model, tokenizer = base_model.load(resolved, spec, numerics.weights_dtype, numerics.device)
        self.engine = Engine(
            model,
            tokenizer,
            self.metrics,
            autocast=numerics.autocast is not None,
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            max_batch_tokens=self.options.max_batch_tokens,
            max_queue_seconds=self.options.max_queue_seconds,
            prefix_cache=self.options.prefix_cache,
        )
        self.engine.start()
        workdir = Path(tempfile.mkdtemp(prefix="sectune-serve-"))
        self.registry = Registry(
            self.engine, self.metrics, workdir, resolved.digest, self.options.max_adapter_bytes
        )
        self.loading = "loading adapters"
        self.watcher = ConfigWatcher(self.registry, self.metrics, config, self.options.config_path)
        self.watcher.apply(config)
        self.configure_feedback(config.feedback)
        self.loading = ""

    def configure_feedback(self, settings: FeedbackSettings) -> None:
        """Hold predictions and store verdicts as `settings` say (at start and whenever the
        config's feedback section changes); a store that changes gets what was pending first."""
        if settings == self.feedback_settings:
            return
        previous, self.feedback_settings = self.feedback_settings, settings
        if settings.store is None:
            self.predictions = None
        elif self.predictions is None:
            self.predictions = PredictionLog(settings.window_minutes * 60, settings.max_predictions)
        else:
            self.predictions.window = settings.window_minutes * 60
            self.predictions.max_predictions = settings.max_predictions
        if previous is None or previous.store != settings.store or self.feedback is None:
            if self.feedback is not None:
                self.feedback.close()
            self.feedback = FeedbackWriter(settings, self.metrics) if settings.store else None
        else:
            self.feedback.batch_size = settings.batch_size
            self.feedback.flush_seconds = settings.flush_seconds
        log.info(
            "analysts' verdicts: %s",
            f"stored under {settings.store}" if settings.store else "not kept (no feedback.store)",
        )

    def close(self) -> None:
        """Stop taking work: pending verdicts written, the model's worker stopped."""
        if self.feedback is not None:
            self.feedback.close()
        if self.engine is not None:
            self.engine.stop()

    @staticmethod
    def _base_from_manifests(config: ServingConfig) -> BaseModelSpec:
        from sectune import artifacts, storage

        seen: dict[str, BaseModelSpec] = {}
        for adapter in config.adapters:
            for entry in adapter.versions:
                try:
                    _, manifest = artifacts.read_manifest(
                        *artifacts.resolve_version(entry.uri, entry.sha256)
                    )
                except (artifacts.IntegrityError, storage.StorageError) as exc:
                    log.error("%s@%s: %s", adapter.name, entry.version, exc)
                    continue
                base = manifest.base_model
                seen[base.sha256] = BaseModelSpec.model_validate(
                    {"uri": base.uri, "quantization": base.quantization}
                )
        if not seen:
            raise ManifestError(
                "no adapter could be read to find the base model; set baseModel in the config"
            )
        if len(seen) > 1:
            raise ManifestError(
                "the adapters were trained on different base models ("
                + ", ".join(s.uri for s in seen.values())
                + "); set baseModel, or serve them from separate servers"
            )
        return next(iter(seen.values()))

    def load_api_keys(self) -> None:
        """Keys (and the scrape token) at start-up: a bad file stops the server."""
        if self.options.api_keys_file is not None:
            self.keys = KeysFile(self.options.api_keys_file)
            self.keys.load()
        if self.options.metrics_token_file is not None:
            self.metrics_token = load_token(self.options.metrics_token_file)

    def reload_if_changed(self) -> None:
        if self.watcher is not None:
            self.watcher.reload_if_changed()
            self.configure_feedback(self.watcher.config.feedback)
