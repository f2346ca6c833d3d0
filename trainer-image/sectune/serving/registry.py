"""Which adapter versions are loaded, verified and routed to, and how a config change applies.

Applying a config loads what is new (download, verify every digest, check the base model,
load into the model), reuses what is unchanged, and only then swaps the routing table. A version
that fails to load is reported and skipped; its adapter keeps the versions that did load, or
keeps serving what it served before if none did. The previous good adapter stays served.

A version taken out of the routing table stays loaded for `RETIRE_SECONDS`, so requests routed
to it just before the swap still run: a hot swap fails no request.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sectune import artifacts
from sectune.config import JobSpec
from sectune.contract import AdapterManifest, DecisionRule, RunReport
from sectune.data.example import Example
from sectune.data.format import PromptFormatter, first_tokens_distinct, label_token_ids
from sectune.serving import traffic, verify
from sectune.serving.config import FeedbackSettings, ServedVersion, ServingConfig
from sectune.serving.drift import DriftMonitor, input_reference, reference_distribution
from sectune.serving.engine import Engine
from sectune.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

RETIRE_SECONDS = 30.0
"""How long a replaced version stays loaded for requests already routed to it (the engine's
default queue limit: a request waiting longer is refused anyway)."""


@dataclass
class LoadedVersion:
    adapter: str
    version: str
    key: str
    """The adapter's name inside the model."""
    uri: str
    sha256: str
    traffic: int
    spec: JobSpec
    formatter: PromptFormatter
    manifest: AdapterManifest
    report: RunReport
    drift: DriftMonitor | None = None
    """Predicted labels against the evaluation-time mix (classification)."""
    input_drift: DriftMonitor | None = None
    """Prompt lengths against the held-out data's (every task type)."""
    label_ids: list[list[int]] = field(default_factory=list)
    distinct_first_tokens: bool = True
    shadow: float = 0.0
    """Fraction of the adapter's unpinned classify requests it also scores, unseen."""
    decision: DecisionRule | None = None
    """The rule its evaluation fitted for task.recallTargets (None: argmax)."""

    def decide(self, probabilities: list[float]) -> int:
        """The index of the label this version answers with."""
        labels = self.spec.task.labels
        if self.decision is not None:
            return self.decision.decide(probabilities, labels)
        return max(range(len(labels)), key=probabilities.__getitem__)

    loaded_at: float = field(default_factory=time.time)

    @property
    def model_id(self) -> str:
        return f"{self.adapter}@{self.version}"

    def describe(self, full: bool = False) -> dict[str, Any]:
        info: dict[str, Any] = {
            "version": self.version,
            "sha256": self.sha256,
            "uri": self.uri,
            "traffic": self.traffic,
            "shadow": self.shadow,
            "job": self.manifest.job,
            "run": self.manifest.run,
            "task": self.spec.task.type,
            "labels": self.spec.task.labels,
            "gatesPassed": self.manifest.gates_passed,
            "loadedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
        }
        if full:
            info["config"] = self.manifest.config
            info["training"] = {
                "metrics": self.manifest.metrics,
                "baselines": self.report.baselines(),
            }
        return info


@dataclass(frozen=True)
class ApplyResult:
    loaded: list[str]
    failed: dict[str, str]
    removed: list[str]


class Registry:
    def __init__(
        self,
        engine: Engine,
        metrics: ServingMetrics,
        workdir: Path,
        base_digest: str,
        max_adapter_bytes: int = artifacts.MAX_ARTIFACT_BYTES,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.workdir = workdir
        self.base_digest = base_digest
        self.max_adapter_bytes = max_adapter_bytes
        self._routes: dict[str, list[LoadedVersion]] = {}
        self._errors: dict[str, str] = {}
        self._refused: dict[tuple[str, str], str] = {}
        self._retired: dict[str, tuple[float, LoadedVersion]] = {}
        """Versions out of the routing table, by key, with when they are unloaded."""
        self._drift_threshold = 0.0
        self._feedback = FeedbackSettings()  # type: ignore[call-arg]
        self._configured: list[str] = []
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()
        self._apply_lock = threading.Lock()
        self._random = random.Random()

    # ------------------------------------------------------------------ reading

    def route(self, model: str) -> LoadedVersion:
        """The version that answers a request for `model` ("name" or "name@version")."""
        name, at, pinned = model.partition("@")
        with self._lock:
            versions = self._routes.get(name)
        if not versions:
            raise KeyError(model)
        if at:
            for version in versions:
                if version.version == pinned:
                    return version
            raise KeyError(model)
        return traffic.pick(versions, self._random)

    def shadows(self, adapter: str) -> list[LoadedVersion]:
        """The adapter's shadow versions (traffic 0, a shadow fraction)."""
        with self._lock:
            return [v for v in self._routes.get(adapter, []) if v.shadow > 0 and v.traffic == 0]

    def versions(self) -> dict[str, list[LoadedVersion]]:
        with self._lock:
            return {name: list(v) for name, v in self._routes.items()}

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def resolved(self, model_id: str) -> str | None:
        """The manifest digest `name@version` resolved to when last applied (loaded or not)."""
        with self._lock:
            return self._resolved.get(model_id)

    def not_ready(self) -> list[str]:
        """Configured adapters with no version loaded."""
        with self._lock:
            return [name for name in self._configured if not self._routes.get(name)]

    # ------------------------------------------------------------------ applying

    def apply(self, config: ServingConfig) -> ApplyResult:
        with self._apply_lock:
            return self._apply(config)

    def _apply(self, config: ServingConfig) -> ApplyResult:
        current = self.versions()
        loaded_now: list[str] = []
        failed: dict[str, str] = {}
        refused: dict[tuple[str, str], str] = {}
        new_routes: dict[str, list[LoadedVersion]] = {}
        for adapter in config.adapters:
            served: list[LoadedVersion] = []
            for entry in adapter.versions:
                label = f"{adapter.name}@{entry.version}"
                try:
                    version, fresh = self._obtain(adapter.name, entry, current, config)
                except verify.LoadError as exc:
                    failed[label] = str(exc)
                    refused[(adapter.name, entry.version)] = exc.reason
                    self.metrics.load_failures.labels(adapter.name, entry.version, exc.reason).inc()
                    log.error("not serving %s: %s", label, exc)
                    continue
                served.append(version)
                if fresh:
                    loaded_now.append(label)
                    log.info("loaded %s (sha256 %s)", label, version.sha256)
            total = sum(v.traffic for v in served)
            if total:
                for v in served:  # a failed version's share goes to the versions that loaded
                    v.traffic = round(100 * v.traffic / total)
                new_routes[adapter.name] = served
            elif current.get(adapter.name):
                new_routes[adapter.name] = current[adapter.name]
                log.error(
                    "%s: no new version loaded; still serving the previous ones", adapter.name
                )
        kept = {v.key for versions in new_routes.values() for v in versions}
        stale = [v for versions in current.values() for v in versions if v.key not in kept]
        with self._lock:
            for key in kept:
                self._retired.pop(key, None)
            for version in stale:
                self._retired[version.key] = (time.monotonic() + RETIRE_SECONDS, version)
            self._routes = new_routes
            self._errors = failed
            self._refused = refused
            self._configured = [a.name for a in config.adapters]
            self._drift_threshold = config.drift.threshold
            self._feedback = config.feedback
        self.unload_retired()
        self._export_info()
        return ApplyResult(loaded_now, failed, [v.model_id for v in stale])

    def unload_retired(self, now: float | None = None) -> list[str]:
        """Unload versions out of routing for longer than RETIRE_SECONDS."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [v for deadline, v in self._retired.values() if deadline <= now]
            for version in due:
                del self._retired[version.key]
        for version in due:
            self.engine.unload_adapter(version.key)
            shutil.rmtree(self.workdir / version.key, ignore_errors=True)
            log.info("unloaded %s", version.model_id)
        return [v.model_id for v in due]

    def _obtain(
        self,
        name: str,
        entry: ServedVersion,
        current: dict[str, list[LoadedVersion]],
        config: ServingConfig,
    ) -> tuple[LoadedVersion, bool]:
        version_uri, sha256 = verify.resolve(entry.uri, entry.sha256)
        with self._lock:
            self._resolved[f"{name}@{entry.version}"] = sha256
        with self._lock:
            retired = [v for _, v in self._retired.values() if v.adapter == name]
        for existing in [*current.get(name, []), *retired]:
            if existing.version == entry.version and existing.sha256 == sha256:
                if config.require_passed_gates:
                    verify.require_passed_gates(existing.manifest, existing.uri)
                existing.traffic, existing.shadow = entry.traffic, entry.shadow
                return existing, False
        key = f"{name}--{entry.version}--{sha256[:12]}"
        directory = self.workdir / key
        shutil.rmtree(directory, ignore_errors=True)
        try:
            manifest = verify.fetch(
                version_uri,
                sha256,
                directory,
                include=("adapter/", "report.json"),
                max_bytes=self.max_adapter_bytes,
                passed_gates=config.require_passed_gates,
                base_digest=self.base_digest,
            )
            return self._load(
                name, entry, key, version_uri, sha256, manifest, directory, config
            ), True
        except verify.LoadError:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _load(
        self,
        name: str,
        entry: ServedVersion,
        key: str,
        version_uri: str,
        sha256: str,
        manifest: AdapterManifest,
        directory: Path,
        config: ServingConfig,
    ) -> LoadedVersion:
        adapter_dir = directory / "adapter"
        spec = JobSpec.model_validate(manifest.config)
        report = RunReport.read(directory / "report.json")
        formatter = PromptFormatter(self.engine.tokenizer, spec)
        version = LoadedVersion(
            adapter=name,
            version=entry.version,
            key=key,
            uri=version_uri,
            sha256=sha256,
            traffic=entry.traffic,
            shadow=entry.shadow,
            spec=spec,
            formatter=formatter,
            manifest=manifest,
            report=report,
        )
        window, least = config.drift.window_minutes * 60, config.drift.min_requests
        if spec.task.type == "classification" and spec.task.labels:
            probe = Example("probe", {"text": ""}, spec.task.labels[0])
            version.label_ids = label_token_ids(formatter, probe, spec.task.labels)
            version.distinct_first_tokens = first_tokens_distinct(version.label_ids)
            rule = report.tuned.get("decision", {}).get("rule")
            if rule and spec.task.recall_targets:
                version.decision = DecisionRule.model_validate(rule)
            reference = reference_distribution(report)
            if reference and config.drift.enabled:
                version.drift = DriftMonitor(reference, window, least)
        lengths = input_reference(manifest)
        if lengths and config.drift.enabled:
            version.input_drift = DriftMonitor(lengths, window, least)
        try:
            self.engine.load_adapter(str(adapter_dir), key)
        except Exception as exc:
            raise verify.LoadError(
                "invalid", f"{version_uri}: the adapter does not load: {exc}"
            ) from None
        return version

    # ------------------------------------------------------------------ metrics

    def _export_info(self) -> None:
        for gauge in (
            self.metrics.adapter_info,
            self.metrics.drift,
            self.metrics.input_drift,
            self.metrics.drift_threshold,
            self.metrics.adapter_refused,
            self.metrics.offline_macro_f1,
            self.metrics.feedback_min_verdicts,
            self.metrics.feedback_max_drop,
        ):
            gauge.clear()
        with self._lock:
            refused, threshold = dict(self._refused), self._drift_threshold
            feedback = self._feedback
        for (adapter, version), reason in refused.items():
            self.metrics.adapter_refused.labels(adapter, version, reason).set(1)
        for versions in self.versions().values():
            for v in versions:
                self.metrics.adapter_info.labels(
                    v.adapter, v.version, v.sha256, str(v.traffic)
                ).set(1)
                if v.drift is not None or v.input_drift is not None:
                    self.metrics.drift_threshold.labels(v.adapter, v.version).set(threshold)
                if feedback.store is not None:
                    self._export_feedback(v, feedback)

    def _export_feedback(self, v: LoadedVersion, feedback: FeedbackSettings) -> None:
        """What live quality is judged against, and every verdict series at 0, so that the
        first verdict of a pair is an increase Prometheus sees (a labelled counter otherwise
        has no series before it)."""
        self.metrics.feedback_min_verdicts.labels(v.adapter, v.version).set(feedback.min_verdicts)
        self.metrics.feedback_max_drop.labels(v.adapter, v.version).set(feedback.max_drop)
        offline = v.report.tuned.get("macroF1")
        if isinstance(offline, int | float):
            self.metrics.offline_macro_f1.labels(v.adapter, v.version).set(offline)
        if v.spec.task.type == "classification":
            for predicted in v.spec.task.labels:
                for actual in v.spec.task.labels:
                    correct = str(predicted == actual).lower()
                    self.metrics.verdicts.labels(v.adapter, v.version, predicted, actual, correct)
        else:
            for verdict in ("accepted", "rejected"):
                self.metrics.generation_verdicts.labels(v.adapter, v.version, verdict)

    def update_drift(self) -> None:
        for versions in self.versions().values():
            for v in versions:
                for monitor, gauge in (
                    (v.drift, self.metrics.drift),
                    (v.input_drift, self.metrics.input_drift),
                ):
                    if monitor is None:
                        continue
                    score = monitor.score()
                    if score is None:
                        with contextlib.suppress(KeyError):
                            gauge.remove(v.adapter, v.version)
                    else:
                        gauge.labels(v.adapter, v.version).set(score)
