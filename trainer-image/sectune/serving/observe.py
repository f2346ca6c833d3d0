"""What a vLLM replica serves, in the sectune server's own metrics (the `sectune route-vllm`
sidecar's metrics port).

vLLM exports no `sectune_serve_*` series. What it does say is which LoRA modules it loaded:
`GET /v1/models` lists each with `root`, the directory it was loaded from. The sidecar in every
vLLM pod joins that list with the digests the init container verified (`verified.json`, written
by `sectune fetch-adapters`) and exports, on its metrics port:

- `sectune_serve_adapter_info{adapter,version,sha256,traffic}`: a version vLLM lists under its
  served name `name@version`, loaded from the directory that was verified for it; `traffic` is
  the configured share the router (sectune.serving.vllm_router) sends it.
- `sectune_serve_vllm_up`: 1 when vLLM answered `/v1/models`, else 0.
- the router's per-version request and latency series (it shares this registry);
- then vLLM's own `/metrics`, passed through, so one scrape (annotations or a PodMonitor) sees
  all of it.

`/healthz` answers while the sidecar runs; `/ready` answers 200 only when vLLM lists every
configured version: the pod is Ready when vLLM serves the whole verified set, and the operator
reads the served digests as it does from a sectune server (sectune_operator.serving_status).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import Gauge, generate_latest

from sectune.serving.config import ServingConfig
from sectune.serving.fetch import Verified, read_verified
from sectune.serving.metrics import ServingMetrics

log = logging.getLogger("sectune.observe")

API_KEY_ENV = "SECTUNE_VLLM_API_KEY"
"""The key vLLM was started with (`--api-key`), from the same Secret."""
READ_LIMIT = 1 << 20
"""vLLM's /v1/models and /metrics are a few KB to a few hundred KB."""


@dataclass(frozen=True)
class Listing:
    """What vLLM answered on /v1/models: model id -> the directory it was loaded from."""

    roots: dict[str, str | None]

    @classmethod
    def parse(cls, body: Any) -> Listing:
        """The OpenAI list shape (`{"object": "list", "data": [{"id", "root", …}]}`)."""
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise ValueError("/v1/models: not an OpenAI model list (no data array)")
        roots: dict[str, str | None] = {}
        for entry in body["data"]:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                root = entry.get("root")
                roots[entry["id"]] = root if isinstance(root, str) else None
        return cls(roots)

    def loaded_from(self, model: str, path: str) -> bool:
        """vLLM lists `model`, loaded from `path` (a listing without `root` is trusted on id:
        the only modules vLLM has are the ones it was started with)."""
        if model not in self.roots:
            return False
        root = self.roots[model]
        return root is None or os.path.normpath(root) == os.path.normpath(path)


@dataclass
class Served:
    """The versions vLLM serves as verified, and the ones it does not (yet)."""

    info: list[tuple[str, str, str, int]] = field(default_factory=list)
    """(adapter, version, sha256, traffic), as sectune_serve_adapter_info labels them."""
    missing: list[str] = field(default_factory=list)
    """`name@version`: configured, but not verified or not listed by vLLM."""


def served(config: ServingConfig, verified: list[Verified], listing: Listing) -> Served:
    """Join the configured versions with what was verified and what vLLM lists."""
    digests = {(v.adapter, v.version): v for v in verified}
    result = Served()
    for adapter in config.adapters:
        for entry in adapter.versions:
            pinned = f"{adapter.name}@{entry.version}"
            known = digests.get((adapter.name, entry.version))
            if known is None or not listing.loaded_from(pinned, known.path):
                result.missing.append(pinned)
                continue
            result.info.append((adapter.name, entry.version, known.sha256, entry.traffic))
    return result


@dataclass
class Observer:
    """Asks vLLM what it serves (at most every `interval` seconds) and renders the metrics."""

    config: ServingConfig
    verified: list[Verified]
    vllm_url: str
    api_key: str | None = None
    interval: float = 2.0
    timeout: float = 2.0
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    _state: tuple[float, Served | None] = (0.0, None)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.up = Gauge(
            "sectune_serve_vllm_up",
            "1 when vLLM answered GET /v1/models on the last look, else 0.",
            registry=self.metrics.registry,
        )

    def _get(self, path: str, authorized: bool) -> bytes:
        request = urllib.request.Request(self.vllm_url.rstrip("/") + path)
        if authorized and self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body: bytes = response.read(READ_LIMIT + 1)
        if len(body) > READ_LIMIT:
            raise ValueError(f"{path}: larger than {READ_LIMIT} bytes")
        return body

    def look(self) -> Served | None:
        """What vLLM serves now (cached for `interval`); None when it does not answer."""
        with self._lock:
            at, state = self._state
            if time.monotonic() - at < self.interval:
                return state
            try:
                listing = Listing.parse(json.loads(self._get("/v1/models", authorized=True)))
                state = served(self.config, self.verified, listing)
            except urllib.error.HTTPError as exc:
                hint = " (the API key is not the one vLLM was started with)" * (exc.code == 401)
                log.warning("vLLM answered /v1/models with %s%s", exc.code, hint)
                state = None
            except (OSError, ValueError) as exc:
                log.info("vLLM does not answer /v1/models yet: %s", exc)
                state = None
            self._state = (time.monotonic(), state)
            self._export(state)
            return state

    def _export(self, state: Served | None) -> None:
        self.metrics.adapter_info.clear()
        self.up.set(0 if state is None else 1)
        for adapter, version, sha256, traffic in state.info if state else []:
            self.metrics.adapter_info.labels(adapter, version, sha256, str(traffic)).set(1)

    def render(self) -> bytes:
        """The sidecar's series, then vLLM's own /metrics (omitted when vLLM does not answer)."""
        self.look()
        own = generate_latest(self.metrics.registry)
        try:
            theirs = self._get("/metrics", authorized=False)
        except (OSError, ValueError):
            theirs = b""
        return own + theirs


def handler(observer: Observer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._answer(200, observer.render(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":  # liveness: the sidecar itself answers
                self._answer(200, b"ok\n")
            elif self.path == "/ready":
                state = observer.look()
                if state is None:
                    self._answer(503, b"vLLM does not answer /v1/models\n")
                elif state.missing:
                    missing = ", ".join(state.missing)
                    self._answer(503, f"not served by vLLM: {missing}\n".encode())
                else:
                    self._answer(200, b"ok\n")
            else:
                self._answer(404, b"not found\n")

        def _answer(self, code: int, body: bytes, kind: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # probes every few seconds: not logged
            return None

    return Handler


def serve(
    config: ServingConfig,
    adapters: Path,
    vllm_url: str,
    host: str,
    port: int,
    metrics: ServingMetrics,
) -> ThreadingHTTPServer:
    """The metrics and probe server (not yet started: call serve_forever); `metrics` is the
    registry the router records requests in."""
    observer = Observer(
        config,
        read_verified(adapters),
        vllm_url,
        api_key=os.environ.get(API_KEY_ENV) or None,
        metrics=metrics,
    )
    return ThreadingHTTPServer((host, port), handler(observer))
