"""vLLM's documented HTTP contract, played for the parts of a vLLM pod that talk to it.

vLLM does not run on this machine (no GPU). What the operator and the observer sidecar rely on
is what vLLM's documentation shows for `vllm serve --enable-lora --lora-modules name=path …`
(docs/features/lora.md, "Serving LoRA Adapters" and "Lora model lineage in model card"):

- `GET /v1/models` answers the OpenAI list, the base model first, then one entry per LoRA
  module with `id` = its name, `root` = the path it was loaded from, `parent` = the base;
  behind `--api-key`, every `/v1` route answers 401 without `Authorization: Bearer <key>`.
- `GET /metrics` is open and exports `vllm:*` series labelled with the served model name only
  (requests to a LoRA module count under the base model: vllm-project/vllm#11091), plus
  `vllm:lora_requests_info`.
- `POST /v1/chat/completions` and `/v1/completions` answer for a listed `model` in OpenAI's
  shape, whole or (`stream: true`) as server-sent events ending in `data: [DONE]`; an unknown
  model is a 404 `NotFoundError`; a request that fails in the engine is a 500. The answer
  names the model that gave it, so a test sees where a request was routed; `failing` plays a
  version that fails every request, `aborted` records streams whose client went away.

`VllmContract` builds its answers from the vLLM command the operator rendered, so a rendering
change the contract does not accept shows here. It is a contract, not a vLLM run.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{base}"}} 0.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="{base}"}} 3.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{{max_lora="{max_lora}",running_lora_adapters="",waiting_lora_adapters=""}} 1.0
"""


def lora_modules(command: list[str]) -> dict[str, str]:
    """`--lora-modules name=path …` of a rendered `vllm serve` command: name -> path."""
    start = command.index("--lora-modules") + 1
    modules = {}
    for arg in command[start:]:
        if arg.startswith("--"):
            break
        name, _, path = arg.partition("=")
        modules[name] = path
    return modules


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


@dataclass
class VllmContract:
    """A server answering as `vllm serve` documents, for the command it was rendered with."""

    command: list[str]
    paths: dict[str, str] = field(default_factory=dict)
    """Path prefixes of the pod mapped to this machine's (the adapters volume)."""
    api_key: str | None = None
    listed: bool = True
    """False: vLLM still loading (the API is not up: connection refused is the same to a
    client; here /v1/models answers 503)."""
    failing: set[str] = field(default_factory=set)
    """Served names whose requests fail in the engine (500)."""
    stream_chunks: int = 3
    chunk_seconds: float = 0.0
    answered: list[str] = field(default_factory=list)
    """The served name of every completion answered (whole or streamed to its end)."""
    aborted: list[str] = field(default_factory=list)
    """Served names of streams the client left before the end."""
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def models(self) -> dict[str, Any]:
        base = option(self.command, "--served-model-name") or self.command[2]
        data = [{"id": base, "object": "model", "owned_by": "vllm", "root": self.command[2],
                 "parent": None, "permission": [{"object": "model_permission"}]}]  # fmt: skip
        for name, path in lora_modules(self.command).items():
            for pod_prefix, local in self.paths.items():
                if path.startswith(pod_prefix):
                    path = local + path[len(pod_prefix) :]
            data.append({"id": name, "object": "model", "owned_by": "vllm", "root": path,
                         "parent": base, "permission": [{"object": "model_permission"}]})  # fmt: skip
        return {"object": "list", "data": data}

    def start(self) -> VllmContract:
        contract = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    base = option(contract.command, "--served-model-name") or "base"
                    max_lora = option(contract.command, "--max-loras") or "1"
                    text = METRICS.format(base=base, max_lora=max_lora)
                    return self._send(200, text.encode(), "text/plain; version=0.0.4")
                if self.path == "/health":
                    return self._send(200, b"", "text/plain")
                if contract.api_key and (
                    self.headers.get("Authorization") != f"Bearer {contract.api_key}"
                ):
                    return self._send(401, b'{"error": "Unauthorized"}', "application/json")
                if self.path == "/v1/models" and contract.listed:
                    body = json.dumps(contract.models()).encode()
                    return self._send(200, body, "application/json")
                self._send(503 if self.path == "/v1/models" else 404, b"{}", "application/json")

            def do_POST(self) -> None:
                if contract.api_key and (
                    self.headers.get("Authorization") != f"Bearer {contract.api_key}"
                ):
                    return self._send(401, b'{"error": "Unauthorized"}', "application/json")
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    return self._send(404, b'{"detail": "Not Found"}', "application/json")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model = body.get("model")
                if model not in {m["id"] for m in contract.models()["data"]}:
                    return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
                if model in contract.failing:
                    return self._error(
                        500, "EngineCore encountered an issue.", "InternalServerError"
                    )
                chat = self.path == "/v1/chat/completions"
                if body.get("stream"):
                    return self._stream(model, chat)
                text = f"answered by {model}"
                choice = {"index": 0, "finish_reason": "stop"} | (
                    {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                )
                answer = {"id": "chatcmpl-1" if chat else "cmpl-1", "created": int(time.time()),
                          "object": "chat.completion" if chat else "text_completion",
                          "model": model, "choices": [choice],
                          "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}  # fmt: skip
                contract.answered.append(model)
                self._send(200, json.dumps(answer).encode(), "application/json")

            def _stream(self, model: str, chat: bool) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.end_headers()  # no length: the stream ends when the connection closes
                words = ["answered ", "by ", model] + ["."] * max(0, contract.stream_chunks - 3)
                try:
                    for word in words:
                        delta = {"content": word} if chat else {}
                        choice = {"index": 0, "finish_reason": None} | (
                            {"delta": delta} if chat else {"text": word}
                        )
                        chunk = {"id": "chatcmpl-1", "model": model, "choices": [choice],
                                 "object": "chat.completion.chunk" if chat else "text_completion"}  # fmt: skip
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(contract.chunk_seconds)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except OSError:  # the client went away: vLLM aborts the request
                    contract.aborted.append(model)
                    return
                contract.answered.append(model)

            def _error(self, code: int, message: str, kind: str) -> None:
                error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
                self._send(code, json.dumps(error).encode(), "application/json")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
