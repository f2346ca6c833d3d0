"""`sectune serve`: the HTTP API over the engine and the registry.

Endpoints (OpenAI-compatible where a client expects it; the `model` field picks the adapter,
`name@version` pins a version, `base` is the base model without an adapter):

    POST /v1/classify            label + per-label probabilities, one forward pass
    POST /v1/chat/completions    chat, the adapter's system prompt added when the request has none
    POST /v1/completions         raw text completion
    GET  /v1/models[/{name}]     adapters, versions, digests (+ training config and metrics)
    GET  /metrics /healthz /readyz

Request and response bodies are never logged: they carry the security data being triaged.
Each /v1/ request gets one JSON access-log line (logger `sectune.access`): time, caller key id,
adapter, version, endpoint, status, latency and token counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from sectune import artifacts
from sectune.config import BaseModelSpec, ManifestError
from sectune.data.format import fit_prompt
from sectune.data.prepare import Example
from sectune.serving.auth import ApiKey, load_api_keys
from sectune.serving.config import BASE_MODEL_NAME, ServingConfig, load_serving_config
from sectune.serving.drift import length_bucket
from sectune.serving.engine import (
    BASE_ADAPTER,
    AdapterGone,
    ClassifyWork,
    Engine,
    GenerateWork,
    Overloaded,
)
from sectune.serving.http import protocol_with_timeout
from sectune.serving.metrics import ServingMetrics
from sectune.serving.registry import LoadedVersion, Registry

log = logging.getLogger(__name__)
access_log = logging.getLogger("sectune.access")

MAX_INPUT_CHARS = 64_000
MAX_NEW_TOKENS = 2048
MAX_BODY_BYTES = 4 * 1024 * 1024
DISCONNECT_POLL_SECONDS = 0.25
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


# ---------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ClassifyRequest(_Body):
    model: str = Field(min_length=1, max_length=200)
    input: str | dict[str, str] = Field(
        description="The text to classify, or the fields the adapter's prompt template names."
    )


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_INPUT_CHARS)


class ChatRequest(_Body):
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


class CompletionRequest(_Body):
    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(max_length=MAX_INPUT_CHARS)
    max_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


# ---------------------------------------------------------------------------- server state


@dataclass
class ServerOptions:
    config_path: Path | None
    config: ServingConfig
    api_keys_file: Path | None = None
    precision: str = "bf16"
    """bf16: weights in bfloat16 (fastest); autocast: float32 weights with bfloat16 autocast
    (the numerics of training-time evaluation); fp32: float32 throughout."""
    max_batch: int = 16
    max_wait_ms: float = 5.0
    reload_interval: float = 5.0
    max_in_flight: int = 64
    """Inference requests accepted at once (queued or running); more get 429 + Retry-After."""
    request_timeout: float = 120.0
    """Seconds a request may take in all; after that it is dropped and answered 504."""
    max_queue_seconds: float = 30.0
    """Seconds a request may wait for the model before it is refused with 503 + Retry-After."""
    max_batch_tokens: int = 16_384
    """Padded tokens (rows × longest row) in one forward pass."""
    max_adapter_bytes: int = field(default_factory=lambda: artifacts.MAX_ARTIFACT_BYTES)
    """Cap on what one adapter version may download."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Host headers answered; empty: loopback names when listening on loopback, else any."""
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
    in_flight: int = 0
    """Inference requests being handled now (only touched on the event loop)."""
    api_keys: list[ApiKey] = field(default_factory=list)
    _config_digest: str = ""

    # -------------------------------------------------------------- startup

    def load(self) -> None:
        """Resolve the base model, load it, start the worker, apply the config."""
        import torch

        from sectune.training import base_model

        config = self.options.config
        spec = config.base_model
        if spec is None:
            self.loading = "reading the adapters' manifests to find their base model"
            spec = self._base_from_manifests(config)
        self.base_uri = spec.uri
        self.loading = f"loading base model {spec.uri}"
        resolved = base_model.resolve(spec)
        precision = self.options.precision
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, tokenizer = base_model.load(resolved, spec, dtype)
        self.engine = Engine(
            model,
            tokenizer,
            self.metrics,
            autocast=precision == "autocast",
            max_batch=self.options.max_batch,
            max_wait_ms=self.options.max_wait_ms,
            max_batch_tokens=self.options.max_batch_tokens,
            max_queue_seconds=self.options.max_queue_seconds,
        )
        self.engine.start()
        workdir = Path(tempfile.mkdtemp(prefix="sectune-serve-"))
        self.registry = Registry(
            self.engine, self.metrics, workdir, resolved.digest, self.options.max_adapter_bytes
        )
        self.loading = "loading adapters"
        self._apply(config)
        self.loading = ""

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
                base = manifest["baseModel"]
                seen[base["sha256"]] = BaseModelSpec(
                    uri=base["uri"], quantization=base.get("quantization", "none")
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

    def _apply(self, config: ServingConfig) -> None:
        assert self.registry is not None
        result = self.registry.apply(config)
        outcome = "partial" if result.failed else "applied"
        self.metrics.reloads.labels(outcome).inc()

    def reload_if_changed(self) -> None:
        """Re-read the config file; apply it when it, or a job's current.json, changed."""
        path = self.options.config_path
        if self.registry is None:
            return
        self.registry.unload_retired()
        if path is None:  # adapters from the command line: only job prefixes can move
            if self._pointers_moved():
                self._apply(self.options.config)
            return
        try:
            text = path.read_bytes()
        except OSError as exc:
            log.error("cannot read %s: %s; keeping the adapters loaded", path, exc.strerror)
            return
        digest = hashlib.sha256(text).hexdigest()
        if digest == self._config_digest and not self._pointers_moved():
            return
        try:
            config = load_serving_config(path)
        except ManifestError as exc:
            self.metrics.reloads.labels("invalid").inc()
            log.error("%s; keeping the adapters loaded", exc)
            self._config_digest = digest
            return
        self._config_digest = digest
        self.options.config = config
        self._apply(config)

    def _pointers_moved(self) -> bool:
        """A version given as a job prefix follows its current.json: did one move?"""
        from sectune import artifacts, storage

        assert self.registry is not None
        for adapter in self.options.config.adapters:
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

    def remember_config(self) -> None:
        if self.options.config_path is not None:
            with contextlib.suppress(OSError):
                self._config_digest = hashlib.sha256(
                    self.options.config_path.read_bytes()
                ).hexdigest()

    def load_api_keys(self) -> None:
        if self.options.api_keys_file is not None:
            self.api_keys = load_api_keys(self.options.api_keys_file)

    def caller(self, header: str | None) -> ApiKey | None:
        """The key the Authorization header carries, or None when it carries no known key."""
        if not header or not header.startswith("Bearer "):
            return None
        given = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).digest()
        found = None
        for key in self.api_keys:  # every key compared, in constant time each
            if hmac.compare_digest(given, key.digest):
                found = key
        return found


# ---------------------------------------------------------------------------- the app


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error"}}
    if field:
        body["error"]["param"] = field
    return JSONResponse(body, status_code=status)


def create_app(state: ServerState, allowed_hosts: list[str] | None = None) -> FastAPI:
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="sectune", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.metrics
    options = state.options

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.message, exc.field)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)  # nobody is listening; for the access log

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        if any(p["loc"] == ("body",) for p in exc.errors()):
            return _error(422, "the body must be a JSON object (Content-Type: application/json)")
        for problem in exc.errors():
            where = ".".join(str(p) for p in problem["loc"] if p != "body")
            problems.append(f"{where or 'body'}: {problem['msg']}")
        first = (
            ".".join(str(p) for p in exc.errors()[0]["loc"] if p != "body")
            if exc.errors()
            else None
        )
        return _error(422, "; ".join(problems), first)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if "chunked" in request.headers.get("transfer-encoding", ""):
            return _error(411, "send the body with a Content-Length (chunked bodies are refused)")
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return _error(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        request.state.caller = None
        request.state.served = None
        request.state.tokens = (0, 0)
        if not request.url.path.startswith("/v1/"):
            passed: Response = await call_next(request)
            return passed
        began = time.perf_counter()
        result: Response
        if state.api_keys:
            request.state.caller = state.caller(request.headers.get("authorization"))
        if state.api_keys and request.state.caller is None:
            result = _error(401, "missing or unknown API key: send Authorization: Bearer <key>")
            result.headers["WWW-Authenticate"] = "Bearer"
        else:
            result = await call_next(request)
        _access_line(request, result.status_code, time.perf_counter() - began)
        return result

    # Outermost: a request naming a host this server does not answer for (DNS rebinding
    # against a server on 127.0.0.1) is refused before anything else reads it.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])

    def engine_and_registry() -> tuple[Engine, Registry]:
        if state.engine is None or state.registry is None or state.loading:
            raise ApiError(503, "not ready: the model is loading", retry_after=5)
        return state.engine, state.registry

    def pick(request: Request, model: str, endpoint: str) -> LoadedVersion | None:
        """The version for `model`, or None for the base model; 403 when the caller's key
        is not allowed to use it."""
        _, registry = engine_and_registry()
        caller: ApiKey | None = request.state.caller
        adapter = model.partition("@")[0]
        if caller is not None and not caller.allows(adapter):
            metrics.requests.labels("forbidden", "", endpoint, "403").inc()
            raise ApiError(403, f"API key {caller.id!r} may not use {adapter!r}", "model")
        if model == BASE_MODEL_NAME:
            request.state.served = (BASE_MODEL_NAME, "")
            return None
        try:
            version = registry.route(model)
        except KeyError:
            metrics.requests.labels("unknown", "", endpoint, "404").inc()
            available = [*sorted(registry.versions()), BASE_MODEL_NAME]
            raise ApiError(
                404,
                f"model {model!r} is not served here; available: {', '.join(available)} "
                "(pin a version as name@version)",
                "model",
            ) from None
        request.state.served = (version.adapter, version.version)
        return version

    def labels(version: LoadedVersion | None) -> tuple[str, str]:
        """The (adapter, version) metric labels of a request's model."""
        return (version.adapter, version.version) if version else (BASE_MODEL_NAME, "")

    def observe(
        request: Request,
        version: LoadedVersion | None,
        endpoint: str,
        began: float,
        prompt: int,
        completion: int,
    ) -> tuple[str, str]:
        request.state.tokens = (prompt, completion)
        if version is not None and version.input_drift is not None:
            version.input_drift.record(length_bucket(prompt))
        adapter, ver = labels(version)
        metrics.latency.labels(adapter, ver, endpoint).observe(time.perf_counter() - began)
        metrics.requests.labels(adapter, ver, endpoint, "200").inc()
        metrics.tokens.labels(adapter, ver, "prompt").inc(prompt)
        if completion:
            metrics.tokens.labels(adapter, ver, "completion").inc(completion)
        return adapter, ver

    async def run(
        request: Request,
        work: ClassifyWork | GenerateWork,
        version: LoadedVersion | None,
        endpoint: str,
        began: float,
    ) -> Any:
        """Submit work to the model and wait for it without holding a thread; drop it when
        the client goes away or the request's deadline passes. At most `max_in_flight`
        requests are in here at once; beyond that, 429 at once."""
        engine, _ = engine_and_registry()
        if state.in_flight >= options.max_in_flight:
            metrics.requests.labels("overloaded", "", "any", "429").inc()
            raise ApiError(429, "the server is at its request limit; retry shortly", retry_after=1)
        adapter, ver = labels(version)
        deadline = began + options.request_timeout
        state.in_flight += 1
        try:
            future = asyncio.wrap_future(engine.submit(work))
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    work.abandon()
                    metrics.requests.labels(adapter, ver, endpoint, "499").inc()
                    raise ClientGone
                if time.perf_counter() > deadline:
                    work.abandon()
                    metrics.requests.labels(adapter, ver, endpoint, "504").inc()
                    raise ApiError(504, f"no answer within {options.request_timeout:g} s")
        except AdapterGone:
            raise ApiError(
                503, "that adapter version was just replaced; retry the request", retry_after=1
            ) from None
        except Overloaded:
            metrics.requests.labels(adapter, ver, endpoint, "503").inc()
            raise ApiError(503, "the model is overloaded; retry shortly", retry_after=2) from None
        except (ApiError, ClientGone):
            raise
        except Exception:
            metrics.requests.labels(adapter, ver, endpoint, "500").inc()
            log.exception("%s request for %s failed", endpoint, adapter)
            raise ApiError(
                500, "the model failed on this request; the server log has why"
            ) from None
        finally:
            state.in_flight -= 1

    def headers(version: LoadedVersion | None) -> dict[str, str]:
        if version is None:
            return {"x-sectune-model": BASE_MODEL_NAME}
        return {"x-sectune-model": version.model_id, "x-sectune-adapter-sha256": version.sha256}

    # Probes run on the event loop, never in the thread pool inference uses: they answer in
    # milliseconds under any load. They say nothing about why (no URIs, no errors): that is
    # in /v1/models, behind the API keys, and in the log.
    @app.get("/healthz")
    async def healthz() -> Response:
        if state.fatal or (state.engine is not None and not state.engine.alive):
            return JSONResponse({"status": "failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.loading or state.registry is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        missing = state.registry.not_ready()
        if missing:
            return JSONResponse(
                {"status": "not ready", "adaptersWithoutVersion": len(missing)}, status_code=503
            )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if state.registry is not None:
            state.registry.update_drift()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_entry(name: str, versions: list[LoadedVersion], full: bool) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "owned_by": "sectune",
            "versions": [v.describe(full) for v in versions],
        }

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        _, registry = engine_and_registry()
        data = [model_entry(n, v, False) for n, v in sorted(registry.versions().items())]
        data.append(
            {"id": BASE_MODEL_NAME, "object": "model", "owned_by": "sectune", "uri": state.base_uri}
        )
        return {"object": "list", "data": data, "errors": registry.errors()}

    @app.get("/v1/models/{name}")
    def get_model(name: str) -> dict[str, Any]:
        _, registry = engine_and_registry()
        versions = registry.versions().get(name)
        if not versions:
            raise ApiError(404, f"model {name!r} is not served here", "model")
        return model_entry(name, versions, True)

    @app.post("/v1/classify")
    async def classify(request: Request, body: ClassifyRequest) -> Response:
        began = time.perf_counter()
        version = pick(request, body.model, "classify")
        if version is None or version.spec.task.type != "classification":
            kind = "the base model" if version is None else f"a {version.spec.task.type} adapter"
            raise ApiError(
                400,
                f"{body.model} is {kind}; /v1/classify needs a classification adapter "
                "(use /v1/chat/completions)",
                "model",
            )
        fields = body.input if isinstance(body.input, dict) else {"text": body.input}
        if sum(len(v) for v in fields.values()) > MAX_INPUT_CHARS:
            raise ApiError(413, f"input is longer than {MAX_INPUT_CHARS} characters", "input")
        prompt = await run_in_threadpool(
            version.formatter.prompt_ids, Example("request", fields, "")
        )
        # Cut as training cut it (start and end kept), so padding cannot push out the
        # instructions and the alert.
        longest_label = max((len(ids) for ids in version.label_ids), default=1)
        prompt = fit_prompt(prompt, version.spec.hyperparameters.max_seq_length - longest_label)
        probabilities = await run(
            request,
            ClassifyWork(
                version.key,
                prompt,
                label_ids=version.label_ids,
                distinct_first_tokens=version.distinct_first_tokens,
            ),
            version,
            "classify",
            began,
        )
        labels = version.spec.task.labels
        best = max(range(len(labels)), key=probabilities.__getitem__)
        adapter, ver = observe(request, version, "classify", began, len(prompt), 0)
        metrics.predictions.labels(adapter, ver, labels[best]).inc()
        metrics.confidence.labels(adapter, ver).observe(probabilities[best])
        if version.drift is not None:
            version.drift.record(labels[best])
        return JSONResponse(
            {
                "object": "classification",
                "model": version.model_id,
                "label": labels[best],
                "confidence": probabilities[best],
                "probabilities": dict(zip(labels, probabilities, strict=True)),
                "usage": {"prompt_tokens": len(prompt)},
            },
            headers=headers(version),
        )

    def fit_to_context(
        engine: Engine,
        version: LoadedVersion | None,
        prompt: list[int],
        max_tokens: int,
        field_name: str,
    ) -> list[int]:
        """An adapter's prompt is cut as its training cut it; a prompt that cannot fit the
        model's context with `max_tokens` after it is refused, naming the field."""
        room = engine.context_length - max_tokens
        if version is not None:
            room = min(room, version.spec.hyperparameters.max_seq_length)
            if room >= 8:
                return fit_prompt(prompt, room)
        if len(prompt) > room:
            raise ApiError(
                400,
                f"the prompt is {len(prompt)} tokens; with max_tokens {max_tokens} the model's "
                f"context of {engine.context_length} leaves room for {max(room, 0)}. Shorten "
                "it or lower max_tokens.",
                field_name,
            )
        return prompt

    async def complete(
        request: Request,
        version: LoadedVersion | None,
        prompt: list[int],
        body: ChatRequest | CompletionRequest,
        endpoint: str,
        began: float,
    ) -> tuple[str, str, dict[str, int]]:
        engine, _ = engine_and_registry()
        if body.stream:
            raise ApiError(
                400, "streaming responses are not supported yet; set stream: false", "stream"
            )
        key = version.key if version is not None else BASE_ADAPTER
        work = GenerateWork(
            key,
            prompt,
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )
        generated = await run(request, work, version, endpoint, began)
        text = engine.tokenizer.decode(generated.token_ids, skip_special_tokens=True).strip()
        observe(request, version, endpoint, began, len(prompt), len(generated.token_ids))
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(generated.token_ids),
            "total_tokens": len(prompt) + len(generated.token_ids),
        }
        return text, generated.finish_reason, usage

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest) -> Response:
        began = time.perf_counter()
        engine, _ = engine_and_registry()
        version = pick(request, body.model, "chat")
        messages = [m.model_dump() for m in body.messages]
        if (
            version is not None
            and messages[0]["role"] != "system"
            and version.spec.task.system_prompt
        ):
            messages.insert(0, {"role": "system", "content": version.spec.task.system_prompt})

        def tokenize() -> list[int]:
            text = engine.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

        prompt = fit_to_context(
            engine, version, await run_in_threadpool(tokenize), body.max_tokens, "messages"
        )
        content, finish, usage = await complete(request, version, prompt, body, "chat", began)
        return JSONResponse(
            {
                "id": f"chatcmpl-{time.time_ns():x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": version.model_id if version else BASE_MODEL_NAME,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            },
            headers=headers(version),
        )

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest) -> Response:
        began = time.perf_counter()
        engine, _ = engine_and_registry()
        version = pick(request, body.model, "completions")

        def tokenize() -> list[int]:
            return list(engine.tokenizer(body.prompt, add_special_tokens=False)["input_ids"])

        prompt = fit_to_context(
            engine, version, await run_in_threadpool(tokenize), body.max_tokens, "prompt"
        )
        content, finish, usage = await complete(
            request, version, prompt, body, "completions", began
        )
        return JSONResponse(
            {
                "id": f"cmpl-{time.time_ns():x}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": version.model_id if version else BASE_MODEL_NAME,
                "choices": [{"index": 0, "text": content, "finish_reason": finish}],
                "usage": usage,
            },
            headers=headers(version),
        )

    return app


def _access_line(request: Request, status: int, seconds: float) -> None:
    """One JSON line per API request: who, which model, what came of it. Never the body, never
    the key (only its id from the keys file)."""
    import json

    caller: ApiKey | None = request.state.caller
    adapter, version = request.state.served or (None, None)
    prompt, completion = request.state.tokens
    access_log.info(
        json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "key": caller.id if caller else None,
                "method": request.method,
                "endpoint": request.url.path,
                "adapter": adapter,
                "version": version or None,
                "status": status,
                "latencyMs": round(seconds * 1000, 1),
                "promptTokens": prompt,
                "completionTokens": completion,
            },
            separators=(",", ":"),
        )
    )


def default_allowed_hosts(host: str) -> list[str]:
    """Loopback names when listening on loopback (a browser page cannot reach a keyless local
    server through a rebinding DNS name); any host otherwise (pods are reached by IP and by
    Service names the server cannot know)."""
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_HOSTS if loopback else ["*"]


def serve(
    options: ServerOptions, host: str, port: int, ready: Callable[[str], None] | None = None
) -> int:
    """Run the server until SIGTERM/SIGINT. Loading happens after the port is open, so
    /healthz and /readyz answer (503 "loading …") while the base model and adapters load."""
    import uvicorn

    state = ServerState(options)
    state.load_api_keys()
    state.remember_config()
    app = create_app(state, options.allowed_hosts or default_allowed_hosts(host))

    class GracefulServer(uvicorn.Server):
        """Finishes in-flight requests on SIGTERM/SIGINT, then returns (uvicorn's default
        re-raises the signal, which would skip the clean-up below)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    server = GracefulServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            http=protocol_with_timeout(options.read_timeout),
            limit_concurrency=options.max_connections,
            timeout_keep_alive=5,
        )
    )
    stop = threading.Event()

    def load_then_watch() -> None:
        try:
            state.load()
        except Exception as exc:
            state.fatal = str(exc)
            log.error("cannot start serving: %s", exc)
            server.should_exit = True
            return
        if ready:
            ready(
                f"serving {', '.join(sorted(state.registry.versions())) if state.registry else ''}"
            )
        while not stop.wait(options.reload_interval):
            try:
                state.reload_if_changed()
            except Exception:
                log.exception("config reload failed; keeping the adapters loaded")

    def reload_now(*_: Any) -> None:
        threading.Thread(target=state.reload_if_changed, daemon=True).start()

    signal.signal(signal.SIGHUP, reload_now)
    loader = threading.Thread(target=load_then_watch, name="sectune-loader", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        stop.set()
        if state.engine is not None:
            state.engine.stop()
        if state.registry is not None:  # the verified adapter files downloaded at load
            shutil.rmtree(state.registry.workdir, ignore_errors=True)
    return 1 if state.fatal else 0
