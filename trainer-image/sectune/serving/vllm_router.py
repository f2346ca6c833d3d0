"""`sectune route-vllm`: the front of a vLLM replica, so it is routed, guarded and measured as a
sectune server is.

vLLM counts every adapter's requests under the base model's name (vllm-project/vllm#11091), so
per-version figures, and with them canary analysis, cannot be read from vLLM. This sidecar takes
the pod's API port; vLLM listens on a port only the pod itself uses. For every request it:

- checks the caller's key against the deployment's `api-keys` (the same file, scopes and errors
  as `sectune serve`) and calls vLLM with vLLM's own key;
- resolves `model`: an adapter's name is routed to one of its versions by traffic weight
  (`sectune.serving.traffic.pick`, as the sectune server routes) and sent to vLLM as that
  version's immutable served name `name@version`; a pinned `name@version` goes as it is;
- relays vLLM's answer as it comes (server-sent events chunk by chunk; a client that leaves
  closes the upstream request, which vLLM aborts);
- records `sectune_serve_requests_total` and `sectune_serve_request_duration_seconds` with the
  labels the sectune server uses (adapter, version, endpoint, code, routing), and one access-log
  line per request.

Only the OpenAI routes a client of an AdapterDeployment needs are passed on (`/v1/models`,
`/v1/chat/completions`, `/v1/completions`); vLLM's other routes, its runtime LoRA loading among
them, are not reachable through the Service. `/v1/models` lists what vLLM serves that the key
may use, plus each adapter's routed name.

What it does not do: token counts, drift and verdicts (vLLM's answers are relayed, not parsed),
per-key concurrency and rate limits (vLLM's scheduler queues), and latency judged by canary
analysis (judged on `/v1/classify`, which vLLM does not serve).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sectune.serving import auth, traffic
from sectune.serving.config import BASE_MODEL_NAME, ServedVersion, ServingConfig
from sectune.serving.http import body_refusal, error_response
from sectune.serving.metrics import ServingMetrics

log = logging.getLogger("sectune.route")

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
"""Routes relayed to vLLM, with the `endpoint` label the sectune server gives them."""
LISTING = "/v1/models"
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Routed:
    """Where a request for `model` goes."""

    adapter: str
    version: str
    routing: str
    """traffic (the weighted split chose the version) or pinned (the caller named it)."""

    @property
    def served_name(self) -> str:
        """The name vLLM serves this version under: never reused by another version."""
        return f"{self.adapter}@{self.version}"


class RoutingTable:
    """Each adapter's versions and traffic shares, as the ServingConfig states them."""

    def __init__(self, config: ServingConfig, rng: random.Random | None = None) -> None:
        self.versions: dict[str, list[ServedVersion]] = {
            a.name: list(a.versions) for a in config.adapters
        }
        self._rng = rng or random.Random()

    def resolve(self, model: str) -> Routed | None:
        """The version a request for `model` goes to; None for the base model; KeyError for a
        model this deployment does not serve."""
        if model == BASE_MODEL_NAME:
            return None
        name, at, pinned = model.partition("@")
        versions = self.versions.get(name)
        if not versions:
            raise KeyError(model)
        if at:
            if not any(v.version == pinned for v in versions):
                raise KeyError(model)
            return Routed(name, pinned, "pinned")
        return Routed(name, traffic.pick(versions, self._rng).version, "traffic")


@dataclass
class Router:
    """What the relay needs: vLLM's address and key, the routing table, keys and metrics."""

    vllm_url: str
    table: RoutingTable
    keys: auth.KeysFile | None
    """The deployment's API keys; None: the API answers without keys."""
    metrics: ServingMetrics
    vllm_key: str | None = None
    request_timeout: float = 600.0

    def upstream_headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.vllm_key:
            headers["Authorization"] = f"Bearer {self.vllm_key}"
        return headers


def create_app(router: Router) -> FastAPI:
    app = FastAPI(title="sectune vLLM router", docs_url=None, redoc_url=None, openapi_url=None)
    client = httpx.AsyncClient(
        base_url=router.vllm_url.rstrip("/"),
        timeout=httpx.Timeout(router.request_timeout, connect=CONNECT_TIMEOUT),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
    )
    app.router.on_shutdown.append(client.aclose)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def relay(request: Request) -> Response:
        began = time.perf_counter()
        request.state.caller, request.state.served, request.state.tokens = None, None, (0, 0)
        response = await _answer(router, client, request, began)
        if not isinstance(response, StreamingResponse):  # a relay audits when it ends
            auth.audit(request, response.status_code, time.perf_counter() - began)
        return response

    return app


async def _answer(
    router: Router, client: httpx.AsyncClient, request: Request, began: float
) -> Response:
    path = request.url.path
    endpoint = ENDPOINTS.get(path)
    if endpoint is None and path != LISTING:
        served = ", ".join([LISTING, *ENDPOINTS])
        return error_response(404, f"{path} is not served here; the API serves {served}")
    if (method := "POST" if endpoint else "GET") != request.method:
        return error_response(405, f"{path} takes {method}")
    if (refused := auth.check_caller(router.keys, request)) is not None:
        return refused
    if endpoint is None:
        return await _listing(router, client, request)
    return await _relay(router, client, request, endpoint, began)


async def _listing(router: Router, client: httpx.AsyncClient, request: Request) -> Response:
    """vLLM's model list, only what the key may use, plus each adapter's routed name."""
    try:
        upstream = await client.get(LISTING, headers=router.upstream_headers())
        listed = upstream.json()["data"] if upstream.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        listed = None
    if not isinstance(listed, list):
        return error_response(503, "vLLM does not answer /v1/models yet; retry shortly")
    ids = {e.get("id") for e in listed if isinstance(e, dict)}
    data = [
        e
        for e in listed
        if isinstance(e, dict) and auth.may_use(request, str(e.get("id", "")).partition("@")[0])
    ]
    for name, versions in router.table.versions.items():
        if auth.may_use(request, name) and any(f"{name}@{v.version}" in ids for v in versions):
            data.append({"id": name, "object": "model", "owned_by": "sectune", "root": None,
                         "parent": BASE_MODEL_NAME})  # fmt: skip
    return JSONResponse({"object": "list", "data": data})


async def _relay(
    router: Router, client: httpx.AsyncClient, request: Request, endpoint: str, began: float
) -> Response:
    metrics = router.metrics
    if (refused := body_refusal(request.headers)) is not None:
        return refused
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return error_response(
            422, "the body must be a JSON object (Content-Type: application/json)"
        )
    model = body.get("model")
    if not isinstance(model, str):
        return error_response(422, "model: give the adapter's name (or name@version)", "model")
    adapter = model.partition("@")[0]
    if not auth.may_use(request, adapter):
        metrics.requests.labels("forbidden", "", endpoint, "403", "traffic").inc()
        caller: auth.ApiKey = request.state.caller
        return error_response(403, f"API key {caller.id!r} may not use {adapter!r}", "model")
    try:
        routed = router.table.resolve(model)
    except KeyError:
        metrics.requests.labels("unknown", "", endpoint, "404", "traffic").inc()
        available = [
            n for n in [*router.table.versions, BASE_MODEL_NAME] if auth.may_use(request, n)
        ]
        return error_response(
            404,
            f"model {model!r} is not served here; available: {', '.join(available)} "
            "(pin a version as name@version)",
            "model",
        )
    labels = (routed.adapter, routed.version) if routed else (BASE_MODEL_NAME, "")
    routing = routed.routing if routed else "traffic"
    request.state.served = labels
    if routed:
        body["model"] = routed.served_name
    upstream_request = client.build_request(
        "POST", request.url.path, content=json.dumps(body), headers=router.upstream_headers()
    )
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        log.warning("vLLM did not take a request: %s", exc)
        metrics.requests.labels(*labels, endpoint, "503", routing).inc()
        return error_response(503, "the model server does not answer; retry shortly")

    async def relayed() -> AsyncIterator[bytes]:
        code = str(upstream.status_code)
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("vLLM's answer broke off: %s", exc)
            code = "500"  # the client got part of an answer: the model server failed it
        except BaseException:
            code = "499"  # the client left; closing the upstream request aborts it in vLLM
            raise
        finally:
            await upstream.aclose()
            seconds = time.perf_counter() - began
            metrics.latency.labels(*labels, endpoint, routing).observe(seconds)
            metrics.requests.labels(*labels, endpoint, code, routing).inc()
            auth.audit(request, int(code), seconds)

    headers = {k: v for k, v in upstream.headers.items() if k.lower() == "content-encoding"}
    return StreamingResponse(
        relayed(),
        status_code=upstream.status_code,
        headers=headers,
        media_type=upstream.headers.get("content-type"),
    )
