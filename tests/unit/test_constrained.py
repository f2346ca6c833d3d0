"""Decoding held to a JSON Schema (sectune.constrained), on a random tiny model: what it writes
unconstrained is noise, so a valid document can only come from the constraint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "event": {"enum": ["ssh_login_failed", "sudo_command"]},
        "user": {"type": "string", "maxLength": 6},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
    },
    "required": ["event", "user", "port"],
    "additionalProperties": False,
}


def test_a_batch_holds_its_constrained_rows_to_their_schema_and_leaves_the_others_free(
    tiny_model_dir: Path,
) -> None:
    import jsonschema
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune.constrained import JSON_OBJECT, compiled_grammar
    from sectune.serving.engine import BASE_ADAPTER, Engine, GenerateWork
    from sectune.serving.metrics import ServingMetrics

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = Engine(
        model, tokenizer, ServingMetrics(), autocast=False, max_batch=8, max_wait_ms=200
    )
    engine.start()
    try:
        prompt = list(tokenizer("Failed password for admin from 10.0.0.1")["input_ids"])
        grammars = [
            compiled_grammar(SCHEMA, tokenizer),
            None,
            compiled_grammar(JSON_OBJECT, tokenizer),
        ]
        futures = [
            engine.submit(GenerateWork(BASE_ADAPTER, prompt, max_new_tokens=96, grammar=g))
            for g in grammars
        ]
        held, free, any_object = [f.result() for f in futures]
    finally:
        engine.stop()
    assert held.finish_reason == "stop", held.text
    jsonschema.validate(json.loads(held.text), SCHEMA)
    assert any_object.finish_reason == "stop", any_object.text
    assert isinstance(json.loads(any_object.text), dict)
    assert not free.text.lstrip().startswith("{"), free.text  # the same model, free: no JSON


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "objectx"}, "objectx"),
        ({"type": "string", "pattern": "("}, "regex"),
        ({"enum": ["x" * 70_000]}, "larger than"),
    ],
)
def test_a_schema_that_cannot_constrain_is_refused_saying_why(
    tiny_tokenizer, schema: dict, message: str
) -> None:
    from sectune.constrained import SchemaError, grammar_for

    with pytest.raises(SchemaError, match=message):
        grammar_for(schema, tiny_tokenizer)


def test_the_schema_an_answer_is_held_to() -> None:
    """The request's response_format; else, in chat, an extraction adapter's outputSchema;
    `type: text` frees it; a classification adapter's chat is free."""
    from types import SimpleNamespace

    from sectune.constrained import JSON_OBJECT
    from sectune.serving.routes import CHAT, COMPLETIONS, ChatRequest, output_schema

    def version(task_type: str) -> object:
        task = SimpleNamespace(
            type=task_type, output_schema=SCHEMA if task_type == "extraction" else None
        )
        return SimpleNamespace(spec=SimpleNamespace(task=task))

    def chat(**fields: object) -> ChatRequest:
        return ChatRequest.model_validate(
            {"model": "parse", "messages": [{"role": "user", "content": "x"}], **fields}
        )

    extraction, classification = version("extraction"), version("classification")
    assert output_schema(extraction, chat(), CHAT) == SCHEMA  # type: ignore[arg-type]
    assert output_schema(extraction, chat(), COMPLETIONS) is None  # type: ignore[arg-type]
    assert output_schema(classification, chat(), CHAT) is None  # type: ignore[arg-type]
    free = chat(response_format={"type": "text"})
    assert output_schema(extraction, free, CHAT) is None  # type: ignore[arg-type]
    anything = chat(response_format={"type": "json_object"})
    assert output_schema(classification, anything, CHAT) == JSON_OBJECT  # type: ignore[arg-type]
    given = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}
    assert output_schema(None, chat(response_format=given), CHAT) == {"type": "array"}
