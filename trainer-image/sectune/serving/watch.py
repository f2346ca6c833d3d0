"""Hot reload: re-read the serving config when its file changes (the kubelet swaps a mounted
ConfigMap atomically), follow job prefixes whose current.json moved, and apply the result to
the registry. An invalid file is reported and ignored: what is loaded stays served."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from pathlib import Path

from sectune import artifacts, storage
from sectune.config import ManifestError
from sectune.serving.config import ServingConfig, load_serving_config
from sectune.serving.metrics import ServingMetrics
from sectune.serving.registry import Registry

log = logging.getLogger(__name__)

POINTER_CHECK_SECONDS = 5.0
"""How often job prefixes' current.json are read (a storage request each); the config file is
checked at every reload interval (a local stat and hash)."""


class ConfigWatcher:
    def __init__(
        self,
        registry: Registry,
        metrics: ServingMetrics,
        config: ServingConfig,
        config_path: Path | None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.config = config
        self.config_path = config_path
        self._digest = ""
        self._pointers_checked = time.monotonic()
        if config_path is not None:
            with contextlib.suppress(OSError):
                self._digest = hashlib.sha256(config_path.read_bytes()).hexdigest()

    def apply(self, config: ServingConfig) -> None:
        result = self.registry.apply(config)
        self.metrics.reloads.labels("partial" if result.failed else "applied").inc()

    def reload_if_changed(self) -> None:
        """Unload versions retired long enough; re-read the config file; apply it when it, or a
        job's current.json, changed."""
        self.registry.unload_retired()
        path = self.config_path
        if path is None:  # adapters from the command line: only job prefixes can move
            if self._pointers_moved():
                self.apply(self.config)
            return
        try:
            text = path.read_bytes()
        except OSError as exc:
            log.error("cannot read %s: %s; keeping the adapters loaded", path, exc.strerror)
            return
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._digest and not self._pointers_moved():
            return
        self._digest = digest
        try:
            config = load_serving_config(path)
        except ManifestError as exc:
            self.metrics.reloads.labels("invalid").inc()
            log.error("%s; keeping the adapters loaded", exc)
            return
        self.config = config
        self.apply(config)

    def _pointers_moved(self) -> bool:
        """A version given as a job prefix follows its current.json: did one move?"""
        now = time.monotonic()
        if now - self._pointers_checked < POINTER_CHECK_SECONDS:
            return False
        self._pointers_checked = now
        for adapter in self.config.adapters:
            for entry in adapter.versions:
                if entry.sha256 is not None:
                    continue
                try:
                    _, sha256 = artifacts.resolve_version(entry.uri, None)
                except (artifacts.IntegrityError, storage.StorageError):
                    continue
                # Compared with what was last tried, so a version that failed is not retried
                # (and re-reported) every few seconds, only when its pointer moves again.
                if sha256 != self.registry.resolved(f"{adapter.name}@{entry.version}"):
                    return True
        return False
