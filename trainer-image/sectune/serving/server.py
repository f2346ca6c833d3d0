"""`sectune serve`: the app (limits, keys, audit, host check, routes) and the process that
loads the model after the port opens and watches the config.

Each /v1/ request gets one JSON access-log line (logger `sectune.access`): time, caller key id,
adapter, version, endpoint, status, latency and token counts. Never bodies, never keys.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sectune.contract import ExitCode
from sectune.serving import auth
from sectune.serving.http import body_refusal, error_response, protocol_with_timeout
from sectune.serving.routes import ApiError, ClientGone, router
from sectune.serving.state import ServerOptions, ServerState

__all__ = ["ServerOptions", "ServerState", "create_app", "default_allowed_hosts", "serve"]

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]


def create_app(state: ServerState, allowed_hosts: list[str] | None = None) -> FastAPI:
    from fastapi.exceptions import RequestValidationError

    app = FastAPI(title="sectune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sectune = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        response = error_response(exc.status, exc.message, exc.field)
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
            return error_response(
                422, "the body must be a JSON object (Content-Type: application/json)"
            )
        for problem in exc.errors():
            where = ".".join(str(p) for p in problem["loc"] if p != "body")
            problems.append(f"{where or 'body'}: {problem['msg']}")
        first = (
            ".".join(str(p) for p in exc.errors()[0]["loc"] if p != "body")
            if exc.errors()
            else None
        )
        return error_response(422, "; ".join(problems), first)

    hosts = allowed_hosts or ["*"]

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Any]) -> Response:
        """Host check, body limits, API key; every /v1/ request, refused or not, gets one
        access-log line with the client's address."""
        request.state.caller = None
        request.state.served = None
        request.state.tokens = (0, 0)
        began = time.perf_counter()
        result: Response
        host = request.headers.get("host", "").rsplit(":", 1)[0].strip("[]")
        if "*" not in hosts and host not in [h.strip("[]") for h in hosts]:
            # a name this server does not answer for (DNS rebinding against 127.0.0.1)
            result = error_response(400, "invalid host header")
        elif (refused := body_refusal(request.headers)) is not None:
            result = refused
        elif not request.url.path.startswith("/v1/"):
            return await _metrics_or_probe(request, call_next)
        else:
            result = auth.check_caller(state.keys, request) or await call_next(request)
        auth.audit(request, result.status_code, time.perf_counter() - began)
        return result

    async def _metrics_or_probe(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if request.url.path == "/metrics" and state.metrics_token is not None:
            given = request.headers.get("authorization", "")
            if not auth.token_matches(state.metrics_token, given):
                denied = error_response(
                    401, "/metrics needs the scrape token: Authorization: Bearer"
                )
                denied.headers["WWW-Authenticate"] = "Bearer"
                return denied
        passed: Response = await call_next(request)
        return passed

    app.include_router(router)
    return app


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
        state.close()
        if state.registry is not None:  # the verified adapter files downloaded at load
            shutil.rmtree(state.registry.workdir, ignore_errors=True)
    return ExitCode.INFRASTRUCTURE if state.fatal else ExitCode.OK
