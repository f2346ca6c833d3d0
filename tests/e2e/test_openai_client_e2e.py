"""`sectune serve` as the official `openai` Python client sees it: whole and streamed chat and
completions, `stop`, `max_completion_tokens`, usage in the last chunk, errors raised as the
client's own exceptions, and a streaming client that leaves freeing its slot at once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from support.processes import wait_until
from support.serving import TEXTS
from support.trained import Trained

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

KEY = "client-key-0123456789"


def _client(server: Any) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_the_openai_client_gets_whole_and_streamed_answers_that_agree(
    trained: Trained, serve: Any, tmp_path: Path
) -> None:
    import openai

    keys = tmp_path / "api-keys"
    keys.write_text(f"client {KEY} * concurrency=1\n")
    server = serve("--adapter", f"triage={trained.prefix}/triage", "--api-keys-file", str(keys))
    client = _client(server)
    messages = [{"role": "user", "content": TEXTS[0]}]

    whole = client.chat.completions.create(
        model="triage", messages=messages, max_completion_tokens=24
    )
    assert whole.id.startswith("chatcmpl-") and whole.model.startswith("triage@")
    content = whole.choices[0].message.content or ""
    assert whole.usage is not None and whole.usage.completion_tokens <= 24

    chunks = list(
        client.chat.completions.create(
            model="triage", messages=messages, max_completion_tokens=24, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == content  # greedy: the same answer, piece by piece
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1

    # A stop string ends the answer before it, whole and streamed alike.
    assert len(content) >= 6, content  # long enough to cut inside it
    stop = content[3:6]
    cut = content[: content.index(stop)].strip()
    stopped = client.chat.completions.create(
        model="triage", messages=messages, max_completion_tokens=24, stop=[stop]
    )
    assert stopped.choices[0].message.content == cut
    assert stopped.choices[0].finish_reason == "stop"
    pieces = client.chat.completions.create(
        model="triage", messages=messages, max_completion_tokens=24, stop=stop, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices).strip() == cut

    # Completions stream too.
    text = client.completions.create(model="base", prompt="Failed password", max_tokens=8)
    parts = client.completions.create(
        model="base", prompt="Failed password", max_tokens=8, stream=True
    )
    assert "".join(p.choices[0].text for p in parts).strip() == text.choices[0].text

    # Errors are the client's own exceptions, naming the parameter.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)

    # Structured outputs as the client sends them: the answer is a document of the schema
    # (the tiny random model writes noise when free), and a schema that cannot constrain
    # decoding is refused naming it.
    schema = {
        "type": "object",
        "properties": {"verdict": {"enum": ["benign", "malicious"]}, "score": {"type": "integer",
                       "minimum": 0, "maximum": 100}},
        "required": ["verdict", "score"],
        "additionalProperties": False,
    }  # fmt: skip
    held = client.chat.completions.create(
        model="triage", messages=messages, max_completion_tokens=64,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "triage", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert held.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(held.choices[0].message.content or ""), schema)
    anything = client.chat.completions.create(
        model="triage", messages=messages, max_completion_tokens=8,
        response_format={"type": "json_object"},
    )  # fmt: skip
    # Any object: the random model goes on past 8 tokens, and what it wrote starts one.
    assert (anything.choices[0].message.content or "").startswith("{")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="triage", messages=messages,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
        )  # fmt: skip
    assert refused.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


def test_a_streaming_client_holds_its_slot_and_frees_it_when_it_leaves(
    trained: Trained, serve: Any, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"client {KEY} * concurrency=1\n")
    server = serve(
        "--adapter", f"triage={trained.prefix}/triage", "--api-keys-file", str(keys),
        "--request-timeout", "600",
    )  # fmt: skip
    body = {"model": "base", "prompt": "Failed password for", "max_tokens": 400, "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers=auth, timeout=60
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text_completion"' in first
        # While the stream runs, the key's one slot is taken.
        busy = server.post(
            "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 1}, KEY
        )
        assert busy.status_code == 429, busy.text
    # The client left: its row stops and its slot is free again within moments.
    began = time.monotonic()
    wait_until(
        lambda: server.post(
            "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 1}, KEY
        ).status_code == 200,
        30,
        "slot freed",
    )  # fmt: skip
    assert time.monotonic() - began < 30
    assert (
        server.metric("sectune_serve_requests_total", endpoint="completions", code="499") or 0
    ) >= 1
