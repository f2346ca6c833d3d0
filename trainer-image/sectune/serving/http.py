"""HTTP shared by `sectune serve` and the vLLM router: errors in OpenAI's shape, the body
limit, and the HTTP/1.1 protocol both run on: uvicorn's h11 protocol plus a read deadline.

uvicorn closes idle keep-alive connections, but a client that sends half a request line or
header (or a body slower than it promised) holds its connection for as long as it likes. Here
each request must arrive whole within `read_timeout` seconds of its first byte (or of the
connection opening); otherwise the connection is closed. Requests being answered are not
affected: the deadline stops once the request has been read.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body either server reads."""


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape (`{"error": {"message", "type", "param"}}`)."""
    body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error"}}
    if field:
        body["error"]["param"] = field
    return JSONResponse(body, status_code=status)


def body_refusal(headers: Any) -> JSONResponse | None:
    """The answer to a body refused before it is read: chunked (411) or over MAX_BODY_BYTES
    (413); None when it may be read."""
    if "chunked" in headers.get("transfer-encoding", ""):
        return error_response(
            411, "send the body with a Content-Length (chunked bodies are refused)"
        )
    length = headers.get("content-length", "0")
    if not length.isdigit() or int(length) > MAX_BODY_BYTES:
        return error_response(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    return None


class DeadlineH11Protocol(H11Protocol):
    read_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _too_slow(self) -> None:
        self._read_deadline = None
        if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
            self.transport.close()


def protocol_with_timeout(seconds: float) -> type[DeadlineH11Protocol]:
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout": seconds})
