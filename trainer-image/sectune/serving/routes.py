"""The HTTP API (OpenAI-compatible where a client expects it; the `model` field picks the
adapter, `name@version` pins a version, `base` is the base model without an adapter):

    POST /v1/classify            label + per-label probabilities, one forward pass
    POST /v1/chat/completions    chat, the adapter's system prompt added when the request has none
    POST /v1/completions         raw text completion
    POST /v1/feedback            an analyst's verdict on an answer, by the answer's id
    GET  /v1/models[/{name}]     adapters, versions, digests (+ training config and metrics)
    GET  /metrics /healthz /readyz

Routes take the server's state through a dependency (`State`); request and response bodies are
never logged: they carry the security data being triaged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from sectune.constrained import JSON_OBJECT, SchemaError, compiled_grammar
from sectune.data.example import Example
from sectune.data.format import chat_prompt_ids, fit_prompt, text_ids
from sectune.serving.admission import Refused
from sectune.serving.auth import ApiKey, may_use
from sectune.serving.config import BASE_MODEL_NAME
from sectune.serving.drift import length_bucket
from sectune.serving.engine import (
    BASE_ADAPTER,
    AdapterGone,
    ClassifyWork,
    Engine,
    GenerateWork,
    Overloaded,
    safe_to_send,
)
from sectune.serving.feedback import (
    FeedbackError,
    Held,
    Judgement,
    Prediction,
    VerdictRequest,
    judge,
    new_id,
)
from sectune.serving.peers import FORWARDED_HEADER, id_tag
from sectune.serving.registry import LoadedVersion, Registry
from sectune.serving.state import ServerState

log = logging.getLogger(__name__)

MAX_INPUT_CHARS = 64_000
MAX_NEW_TOKENS = 2048
DISCONNECT_POLL_SECONDS = 0.25


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


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str = Field("response", max_length=64)
    description: str | None = Field(None, max_length=2000)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    """Every answer is held to the schema, strict or not."""


class ResponseFormat(_Body):
    """OpenAI's `response_format`: text (free), json_object (any JSON object) or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Generation(_Body):
    """What OpenAI's chat and completion requests share. Fields a client may send that this
    server does not implement are refused by name (`NOT_IMPLEMENTED`), never ignored."""

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None, max_length=4
    )
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


NOT_IMPLEMENTED = {
    "tools": "tool calls are not implemented yet; leave tools out",
    "logprobs": "logprobs are not implemented yet; leave logprobs out",
}


def refuse_unimplemented(body: _Generation) -> None:
    """A field this server would otherwise ignore is refused, naming it."""
    if body.tools:
        raise ApiError(400, NOT_IMPLEMENTED["tools"], "tools")
    if body.logprobs:
        raise ApiError(400, NOT_IMPLEMENTED["logprobs"], "logprobs")


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)


class CompletionRequest(_Generation):
    prompt: str = Field(max_length=MAX_INPUT_CHARS)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.sectune
    return state


State = Annotated[ServerState, Depends(get_state)]


async def admit(state: State, request: Request) -> AsyncIterator[str]:
    """A slot for this request, taken before its text is templated or tokenized: over the
    server's or its key's limit, or its key's rate, it is refused at once with 429."""
    try:
        tenant = state.admission.enter(request.state.caller)
    except Refused as exc:
        state.metrics.requests.labels("overloaded", "", "any", "429", "traffic").inc()
        raise ApiError(429, str(exc), retry_after=exc.retry_after) from None
    try:
        yield tenant
    finally:
        state.admission.leave(tenant)


Admitted = Annotated[str, Depends(admit)]
router = APIRouter()


# ---------------------------------------------------------------------------- helpers


def engine_and_registry(state: ServerState) -> tuple[Engine, Registry]:
    if state.engine is None or state.registry is None or state.loading:
        raise ApiError(503, "not ready: the model is loading", retry_after=5)
    return state.engine, state.registry


def pick(state: ServerState, request: Request, model: str, endpoint: str) -> LoadedVersion | None:
    """The version for `model`, or None for the base model; 403 when the caller's key
    is not allowed to use it."""
    _, registry = engine_and_registry(state)
    adapter = model.partition("@")[0]
    if not may_use(request, adapter):
        state.metrics.requests.labels("forbidden", "", endpoint, "403", "traffic").inc()
        caller: ApiKey = request.state.caller
        raise ApiError(403, f"API key {caller.id!r} may not use {adapter!r}", "model")
    if model == BASE_MODEL_NAME:
        request.state.served = (BASE_MODEL_NAME, "")
        return None
    try:
        version = registry.route(model)
    except KeyError:
        state.metrics.requests.labels("unknown", "", endpoint, "404", "traffic").inc()
        available = [
            n for n in [*sorted(registry.versions()), BASE_MODEL_NAME] if may_use(request, n)
        ]
        raise ApiError(
            404,
            f"model {model!r} is not served here; available: {', '.join(available)} "
            "(pin a version as name@version)",
            "model",
        ) from None
    request.state.served = (version.adapter, version.version)
    request.state.routing = "pinned" if "@" in model else "traffic"
    return version


def routing(request: Request) -> str:
    """ "pinned" when the caller named the version (name@version), else "traffic": canary
    analysis judges a version only on the requests the weighted split sent it, so a caller
    cannot steer a verdict by pinning requests to the canary."""
    return getattr(request.state, "routing", "traffic")


def labels(version: LoadedVersion | None) -> tuple[str, str]:
    """The (adapter, version) metric labels of a request's model."""
    return (version.adapter, version.version) if version else (BASE_MODEL_NAME, "")


def observe(
    state: ServerState,
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
    state.metrics.latency.labels(adapter, ver, endpoint, routing(request)).observe(
        time.perf_counter() - began
    )
    state.metrics.requests.labels(adapter, ver, endpoint, "200", routing(request)).inc()
    state.metrics.tokens.labels(adapter, ver, "prompt").inc(prompt)
    if completion:
        state.metrics.tokens.labels(adapter, ver, "completion").inc(completion)
    return adapter, ver


async def run(
    state: ServerState,
    request: Request,
    work: ClassifyWork | GenerateWork,
    version: LoadedVersion | None,
    endpoint: str,
    began: float,
) -> Any:
    """Submit work to the model and wait for it without holding a thread; drop it when
    the client goes away or the request's deadline passes. The request was admitted
    (`admit`) before it got here."""
    engine, _ = engine_and_registry(state)
    adapter, ver = labels(version)
    deadline = began + state.options.request_timeout
    try:
        future = asyncio.wrap_future(engine.submit(work))
        while True:
            done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return future.result()
            if await request.is_disconnected():
                work.abandon()
                state.metrics.requests.labels(adapter, ver, endpoint, "499", routing(request)).inc()
                raise ClientGone
            if time.perf_counter() > deadline:
                work.abandon()
                state.metrics.requests.labels(adapter, ver, endpoint, "504", routing(request)).inc()
                raise ApiError(504, f"no answer within {state.options.request_timeout:g} s")
    except AdapterGone:
        raise ApiError(
            503, "that adapter version was just replaced; retry the request", retry_after=1
        ) from None
    except Overloaded:
        state.metrics.requests.labels(adapter, ver, endpoint, "503", routing(request)).inc()
        raise ApiError(503, "the model is overloaded; retry shortly", retry_after=2) from None
    except (ApiError, ClientGone):
        raise
    except Exception:
        state.metrics.requests.labels(adapter, ver, endpoint, "500", routing(request)).inc()
        log.exception("%s request for %s failed", endpoint, adapter)
        raise ApiError(500, "the model failed on this request; the server log has why") from None


def replica_tag(state: ServerState) -> str:
    peers = state.options.peers
    return peers.own_tag if peers is not None else ""


def hold(
    state: ServerState,
    version: LoadedVersion | None,
    output: str,
    prefix: str = "",
    answer_id: str | None = None,
    **given: Any,
) -> str:
    """A fresh id for an answer; with a feedback store configured, the answer is held under
    it for the verdict window (answers of the base model take no verdicts). A label from
    /v1/classify is judged by label; generated text, from any adapter, by accepted/rejected."""
    answer_id = answer_id or new_id(prefix, replica_tag(state))
    if state.predictions is not None and version is not None:
        task = version.spec.task.type
        if "fields" in given:
            given["labels"] = tuple(version.spec.task.labels or ())
        elif task == "classification":
            task = "generation"
        state.predictions.add(
            Prediction(
                id=answer_id,
                adapter=version.adapter,
                version=version.version,
                task=task,
                output=output,
                sanitize=version.spec.dataset.sanitize,
                **given,
            )
        )
    return answer_id


def headers(version: LoadedVersion | None) -> dict[str, str]:
    if version is None:
        return {"x-sectune-model": BASE_MODEL_NAME}
    return {"x-sectune-model": version.model_id, "x-sectune-adapter-sha256": version.sha256}


# Probes run on the event loop, never in the thread pool inference uses: they answer in
# milliseconds under any load. They say nothing about why (no URIs, no errors): that is
# in /v1/models, behind the API keys, and in the log.
@router.get("/healthz")
async def healthz(state: State) -> Response:
    if state.fatal or (state.engine is not None and not state.engine.alive):
        return JSONResponse({"status": "failed"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(state: State) -> Response:
    if state.loading or state.registry is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    missing = state.registry.not_ready()
    if missing:
        return JSONResponse(
            {"status": "not ready", "adaptersWithoutVersion": len(missing)}, status_code=503
        )
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
def prometheus_metrics(state: State) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if state.registry is not None:
        state.registry.update_drift()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def model_entry(name: str, versions: list[LoadedVersion], full: bool) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "owned_by": "sectune",
        "versions": [v.describe(full) for v in versions],
    }


@router.get("/v1/models")
def list_models(state: State, request: Request) -> dict[str, Any]:
    """What the caller's key may use, and nothing else: a key scoped to one adapter learns
    nothing of the others (not their storage, training config or load errors)."""
    _, registry = engine_and_registry(state)
    data = [
        model_entry(n, v, False)
        for n, v in sorted(registry.versions().items())
        if may_use(request, n)
    ]
    if may_use(request, BASE_MODEL_NAME):
        data.append(
            {"id": BASE_MODEL_NAME, "object": "model", "owned_by": "sectune", "uri": state.base_uri}
        )
    errors = {n: e for n, e in registry.errors().items() if may_use(request, n.partition("@")[0])}
    return {"object": "list", "data": data, "errors": errors}


@router.get("/v1/models/{name}")
def get_model(state: State, request: Request, name: str) -> dict[str, Any]:
    _, registry = engine_and_registry(state)
    if not may_use(request, name):  # the same answer whether or not it exists
        caller: ApiKey = request.state.caller
        raise ApiError(403, f"API key {caller.id!r} may not use {name[:200]!r}", "model")
    versions = registry.versions().get(name)
    if not versions:
        raise ApiError(404, f"model {name!r} is not served here", "model")
    return model_entry(name, versions, True)


@router.post("/v1/classify")
async def classify(
    state: State, request: Request, body: ClassifyRequest, tenant: Admitted
) -> Response:
    began = time.perf_counter()
    version = pick(state, request, body.model, "classify")
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
    work = await classify_work(version, fields, tenant)
    prompt = work.prompt
    probabilities = await run(state, request, work, version, "classify", began)
    labels = version.spec.task.labels
    best = version.decide(probabilities)
    adapter, ver = observe(state, request, version, "classify", began, len(prompt), 0)
    answer_id = hold(
        state,
        version,
        labels[best],
        fields=fields,
        probabilities=dict(zip(labels, probabilities, strict=True)),
    )
    if routing(request) == "traffic":
        shadow(state, version, fields, answer_id, labels[best], tenant)
    state.metrics.predictions.labels(adapter, ver, labels[best]).inc()
    state.metrics.confidence.labels(adapter, ver).observe(probabilities[best])
    if version.drift is not None:
        version.drift.record(labels[best])
    return JSONResponse(
        {
            "id": answer_id,
            "object": "classification",
            "model": version.model_id,
            "label": labels[best],
            "confidence": probabilities[best],
            "probabilities": dict(zip(labels, probabilities, strict=True)),
            **({"decidedBy": "recallTargets"} if version.decision is not None else {}),
            "usage": {"prompt_tokens": len(prompt)},
        },
        headers=headers(version),
    )


async def classify_work(
    version: LoadedVersion, fields: dict[str, str], tenant: str
) -> ClassifyWork:
    """A classify request for `version`: its own template, cut as training cut it (start and
    end kept), so padding cannot push out the instructions and the alert."""
    prompt = await run_in_threadpool(version.formatter.prompt_ids, Example("request", fields, ""))
    longest_label = max((len(ids) for ids in version.label_ids), default=1)
    prompt = fit_prompt(prompt, version.spec.hyperparameters.max_seq_length - longest_label)
    return ClassifyWork(
        version.key,
        prompt,
        label_ids=version.label_ids,
        distinct_first_tokens=version.distinct_first_tokens,
        tenant=tenant,
    )


_shadowing: set[asyncio.Task[None]] = set()
"""Shadow scorings in flight (a reference keeps each task alive until it ends)."""


def shadow(
    state: ServerState,
    version: LoadedVersion,
    fields: dict[str, str],
    answer_id: str,
    answered: str,
    tenant: str,
) -> None:
    """Score the request with each of the adapter's shadow versions, for its share of
    requests, after the answer is on its way: the client never waits for it nor sees it."""
    _, registry = engine_and_registry(state)
    for other in registry.shadows(version.adapter):
        if random.random() < other.shadow:
            task = asyncio.create_task(
                score_shadow(state, other, fields, answer_id, answered, tenant)
            )
            _shadowing.add(task)
            task.add_done_callback(_shadowing.discard)


async def score_shadow(
    state: ServerState,
    other: LoadedVersion,
    fields: dict[str, str],
    answer_id: str,
    answered: str,
    tenant: str,
) -> None:
    """One shadow answer: counted as agreeing with the answer given or not, and kept with the
    held answer so an analyst's verdict judges the shadow too. Best effort: under load, or
    while the shadow is swapped out, it is skipped."""
    engine, _ = engine_and_registry(state)
    try:
        work = await classify_work(other, fields, tenant)
        probabilities = await asyncio.wrap_future(engine.submit(work))
    except Exception:
        log.debug("shadow %s skipped a request", other.model_id)
        return
    label = other.spec.task.labels[other.decide(probabilities)]
    agree = str(label == answered).lower()
    state.metrics.shadow_answers.labels(other.adapter, other.version, agree).inc()
    held = state.predictions.get(answer_id) if state.predictions is not None else None
    if held is not None:
        held.shadows[other.version] = label


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


@dataclass(frozen=True)
class Shape:
    """How an endpoint's answers look, whole and streamed (OpenAI's chat or completions)."""

    endpoint: str
    object: str
    prefix: str
    chat: bool

    def choice(self, text: str, finish: str) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    def delta(self, text: str | None, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            return {
                "index": 0,
                "delta": {} if text is None else {"content": text},
                "finish_reason": finish,
            }
        return {"index": 0, "text": text or "", "finish_reason": finish}


CHAT = Shape("chat", "chat.completion", "chatcmpl-", chat=True)
COMPLETIONS = Shape("completions", "text_completion", "cmpl-", chat=False)


def output_schema(
    version: LoadedVersion | None, body: _Generation, shape: Shape
) -> dict[str, Any] | None:
    """The JSON Schema the answer is held to: the request's `response_format`, else, in chat
    with an extraction adapter, the adapter's `task.outputSchema` (`type: text` frees it)."""
    wanted = body.response_format
    if wanted is None:
        spec = version.spec.task if version is not None and shape.chat else None
        return spec.output_schema if spec is not None and spec.type == "extraction" else None
    if wanted.type == "json_object":
        return JSON_OBJECT
    if wanted.type == "json_schema":
        if wanted.json_schema is None:
            raise ApiError(400, "json_schema: give the schema with type json_schema",
                           "response_format.json_schema")  # fmt: skip
        return wanted.json_schema.schema_
    return None


async def grammar(state: ServerState, schema: dict[str, Any] | None) -> str | None:
    if schema is None:
        return None
    engine = state.engine
    assert engine is not None
    try:
        return await run_in_threadpool(compiled_grammar, schema, engine.tokenizer)
    except SchemaError as exc:
        raise ApiError(
            400, f"the JSON Schema cannot constrain decoding: {exc}",
            "response_format.json_schema.schema",
        ) from None  # fmt: skip


def generation_work(
    version: LoadedVersion | None,
    prompt: list[int],
    body: _Generation,
    tenant: str,
    grammar: str | None = None,
) -> GenerateWork:
    return GenerateWork(
        version.key if version is not None else BASE_ADAPTER,
        prompt,
        max_new_tokens=body.new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stops,
        seed=body.seed,
        tenant=tenant,
        grammar=grammar,
    )


def usage(prompt: list[int], completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": len(prompt),
        "completion_tokens": completion,
        "total_tokens": len(prompt) + completion,
    }


async def answer(
    state: ServerState,
    request: Request,
    version: LoadedVersion | None,
    prompt: list[int],
    body: _Generation,
    shape: Shape,
    began: float,
    tenant: str,
    held: dict[str, Any],
) -> Response:
    """Generate the answer and send it whole, or (stream: true) as server-sent events."""
    constraint = await grammar(state, output_schema(version, body, shape))
    work = generation_work(version, prompt, body, tenant, constraint)
    if body.stream:
        return stream(state, request, version, prompt, body, work, shape, began, held)
    generated = await run(state, request, work, version, shape.endpoint, began)
    text = generated.text.strip()
    observe(state, request, version, shape.endpoint, began, len(prompt), len(generated.token_ids))
    answer_id = hold(state, version, text, prefix=shape.prefix, **held)
    return JSONResponse(
        {
            "id": answer_id,
            "object": shape.object,
            "created": int(time.time()),
            "model": version.model_id if version else BASE_MODEL_NAME,
            "choices": [shape.choice(text, generated.finish_reason)],
            "usage": usage(prompt, len(generated.token_ids)),
        },
        headers=headers(version),
    )


def stream(
    state: ServerState,
    request: Request,
    version: LoadedVersion | None,
    prompt: list[int],
    body: _Generation,
    work: GenerateWork,
    shape: Shape,
    began: float,
    held: dict[str, Any],
) -> Response:
    """Server-sent events as OpenAI sends them: a chunk per piece of text (a tail that may
    start a stop string is held back until it is known not to), a last chunk with the finish
    reason, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`. A client
    that disconnects ends its row of the batch at once (its slot is freed); a failure after
    the first chunk is sent as an error event in OpenAI's shape."""
    engine, _ = engine_and_registry(state)
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue[int | None] = asyncio.Queue()

    def on_token(token: int) -> None:  # on the model's thread
        loop.call_soon_threadsafe(tokens.put_nowait, token)

    work.on_token = on_token
    future = engine.submit(work)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))
    answer_id = new_id(shape.prefix, replica_tag(state))
    adapter, ver = labels(version)
    meta = {
        "id": answer_id,
        "object": f"{shape.object}.chunk" if shape.chat else shape.object,
        "created": int(time.time()),
        "model": version.model_id if version else BASE_MODEL_NAME,
    }

    def event(choice: dict[str, Any] | None, **extra: Any) -> str:
        return f"data: {json.dumps(meta | {'choices': [choice] if choice else []} | extra)}\n\n"

    def failed(status: str, message: str) -> str:
        state.metrics.requests.labels(adapter, ver, shape.endpoint, status, routing(request)).inc()
        error = {"message": message, "type": "server_error", "code": status}
        return f"data: {json.dumps({'error': error})}\n\n"

    async def events() -> AsyncIterator[str]:
        ids: list[int] = []
        sent, done = "", False
        try:
            if shape.chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None})  # fmt: skip
            deadline = began + state.options.request_timeout
            while (
                token := await asyncio.wait_for(tokens.get(), deadline - time.perf_counter())
            ) is not None:
                ids.append(token)
                ready = safe_to_send(
                    engine.tokenizer.decode(ids, skip_special_tokens=True), work.stop
                )
                if len(ready) > len(sent) and ready.startswith(sent):
                    yield event(shape.delta(ready[len(sent) :]))
                    sent = ready
            generated = future.result()
            text = generated.text
            if len(text) > len(sent) and text.startswith(sent):
                yield event(shape.delta(text[len(sent) :]))
            yield event(shape.delta(None, generated.finish_reason))
            if body.stream_options and body.stream_options.include_usage:
                yield event(None, usage=usage(prompt, len(generated.token_ids)))
            yield "data: [DONE]\n\n"
            done = True
            observe(state, request, version, shape.endpoint, began, len(prompt), len(ids))
            hold(state, version, text, answer_id=answer_id, **held)
        except TimeoutError:
            yield failed("504", f"no answer within {state.options.request_timeout:g} s")
        except Overloaded:
            yield failed("503", "the model is overloaded; retry shortly")
        except AdapterGone:
            yield failed("503", "that adapter version was just replaced; retry the request")
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: cancelled while waiting for a token, or closed while
            # suspended at a yield (which one depends on where the disconnect finds it).
            state.metrics.requests.labels(
                adapter, ver, shape.endpoint, "499", routing(request)
            ).inc()
            raise
        except Exception:
            log.exception("%s stream for %s failed", shape.endpoint, adapter)
            yield failed("500", "the model failed on this request; the server log has why")
        finally:
            if not done:
                work.abandon()

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers(version))


@router.post("/v1/chat/completions")
async def chat(state: State, request: Request, body: ChatRequest, tenant: Admitted) -> Response:
    began = time.perf_counter()
    refuse_unimplemented(body)
    engine, _ = engine_and_registry(state)
    version = pick(state, request, body.model, "chat")
    messages = [m.model_dump() for m in body.messages]
    if version is not None and messages[0]["role"] != "system" and version.spec.task.system_prompt:
        messages.insert(0, {"role": "system", "content": version.spec.task.system_prompt})

    def tokenize() -> list[int]:
        return chat_prompt_ids(engine.tokenizer, messages)

    prompt = fit_to_context(
        engine, version, await run_in_threadpool(tokenize), body.new_tokens, "messages"
    )
    return await answer(
        state, request, version, prompt, body, CHAT, began, tenant, {"messages": tuple(messages)}
    )


@router.post("/v1/completions")
async def completions(
    state: State, request: Request, body: CompletionRequest, tenant: Admitted
) -> Response:
    began = time.perf_counter()
    refuse_unimplemented(body)
    engine, _ = engine_and_registry(state)
    version = pick(state, request, body.model, "completions")

    def tokenize() -> list[int]:
        return text_ids(engine.tokenizer, body.prompt)

    prompt = fit_to_context(
        engine, version, await run_in_threadpool(tokenize), body.new_tokens, "prompt"
    )
    return await answer(
        state, request, version, prompt, body, COMPLETIONS, began, tenant, {"prompt": body.prompt}
    )


@router.post("/v1/feedback")
async def feedback(
    state: State, request: Request, body: VerdictRequest, tenant: Admitted
) -> Response:
    """An analyst's verdict on one answer, acknowledged once stored (see sectune.serving.feedback);
    the same verdict posted again is answered as before and stored once."""
    if state.predictions is None or state.feedback is None:
        raise ApiError(
            501,
            "this server keeps no verdicts: set feedback.store in the AdapterDeployment "
            "(sectune serve --feedback-store URI on a laptop)",
            "id",
        )
    held = state.predictions.get(body.id)
    if held is None and (passed := await pass_to_holder(state, request, body.id)) is not None:
        return passed
    if held is None:
        window = state.predictions.window / 60
        raise ApiError(
            404,
            f"no answer with id {body.id!r} in the last {window:g} minutes: it is unknown, "
            "expired, or was answered by the base model",
            "id",
        )
    prediction = held.prediction
    if not may_use(request, prediction.adapter):
        caller: ApiKey = request.state.caller
        raise ApiError(403, f"API key {caller.id!r} may not use {prediction.adapter!r}", "id")
    request.state.served = (prediction.adapter, prediction.version)
    try:
        judgement = judge(prediction, body, tenant or "anonymous")
    except FeedbackError as exc:
        raise ApiError(exc.status, exc.message, exc.field) from None
    duplicate = held.verdict is not None
    if held.verdict is not None and held.verdict != judgement.fingerprint:
        raise ApiError(
            409,
            f"a different verdict on {body.id!r} was already taken; verdicts are not "
            "overwritten (the first one is in the feedback store)",
            "id",
        )
    if held.stored is None:
        held.verdict, held.stored = judgement.fingerprint, state.feedback.submit(judgement)
        held.stored.add_done_callback(lambda done: settle(state, held, judgement, done))
    stored = held.stored
    request.state.audit = {
        "prediction": body.id,
        "verdict": "accepted" if judgement.correct else "rejected",
        "duplicate": duplicate,
    }
    try:
        await asyncio.wrap_future(stored)
    except Exception:
        raise ApiError(503, "the verdict could not be stored; retry it", retry_after=2) from None
    return JSONResponse(
        {
            "object": "feedback",
            "id": body.id,
            "model": f"{prediction.adapter}@{prediction.version}",
            "correct": judgement.correct,
            "duplicate": duplicate,
        }
    )


async def pass_to_holder(state: ServerState, request: Request, answer_id: str) -> Response | None:
    """The holder's answer to a verdict on an answer another replica gave (the request as
    the caller sent it, with the caller's key); None when no peer holds it or the request was
    passed on already."""
    peers = state.options.peers
    if peers is None or request.headers.get(FORWARDED_HEADER):
        return None
    holder = await peers.holder(answer_id)
    if holder is None:
        return None
    request.state.audit = {"prediction": answer_id, "passedTo": id_tag(answer_id)}
    headers = {"Content-Type": "application/json", FORWARDED_HEADER: peers.own_tag}
    if authorization := request.headers.get("authorization"):
        headers["Authorization"] = authorization
    try:
        async with httpx.AsyncClient(timeout=state.options.request_timeout) as client:
            answer = await client.post(
                f"http://{holder}/v1/feedback", content=await request.body(), headers=headers
            )
    except httpx.HTTPError:
        raise ApiError(
            503, f"the replica that gave {answer_id!r} does not answer; retry", "id", retry_after=2
        ) from None
    passed = {k: v for k, v in answer.headers.items() if k.lower() == "retry-after"}
    return Response(answer.content, answer.status_code, passed, "application/json")


def settle(state: ServerState, held: Held, judgement: Judgement, done: Any) -> None:
    """Once a verdict's batch is written or not (on the writer's thread): stored, it counts in
    the live-quality metrics, once; not stored, it is forgotten, so a retry submits it again."""
    if done.exception() is not None:
        held.verdict, held.stored = None, None
        return
    p = judgement.prediction
    if p.task == "classification":
        state.metrics.verdicts.labels(
            p.adapter, p.version, p.output, judgement.actual, str(judgement.correct).lower()
        ).inc()
        for version, label in held.shadows.items():  # the same verdict judges each shadow
            state.metrics.verdicts.labels(
                p.adapter, version, label, judgement.actual, str(label == judgement.actual).lower()
            ).inc()
    else:
        state.metrics.generation_verdicts.labels(p.adapter, p.version, judgement.actual).inc()
