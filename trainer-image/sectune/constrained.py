"""Decoding held to a JSON Schema: every token the model may pick keeps the output a prefix of
a document the schema accepts, and the end of turn is allowed only once it is complete.

Used by the server (`response_format` on /v1/chat/completions, and an extraction adapter's
`task.outputSchema` by default) and by evaluation (format compliance with and without it).
The grammar engine is llguidance: it compiles a schema in milliseconds, computes a token mask
in tens of microseconds on a CPU (BENCHMARKS.md, "Structured outputs"), bounds the work an
untrusted schema may cause, and brings no GPU-only dependency.

Separators are the ones `json.dumps` writes (", " and ": "), the form training data is in.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from transformers import LogitsProcessor

JSON_OBJECT: dict[str, Any] = {"type": "object"}
"""`response_format: {"type": "json_object"}`: any JSON object."""
MAX_SCHEMA_CHARS = 64_000
DEFAULTS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance's JsonCompileOptions."""


class SchemaError(ValueError):
    """A schema that cannot constrain decoding; the message says what is wrong with it."""


def grammar_for(schema: dict[str, Any], tokenizer: Any) -> str:
    """The llguidance grammar of `schema`, checked against `tokenizer` (raises SchemaError)."""
    import llguidance

    if not isinstance(schema, dict):
        raise SchemaError("must be a JSON Schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"larger than {MAX_SCHEMA_CHARS} characters")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=DEFAULTS)
    except (ValueError, TypeError) as exc:
        raise SchemaError(str(exc)) from None
    problem = llguidance.LLMatcher.validate_grammar(grammar, vocabulary(tokenizer))
    if problem:
        raise SchemaError(problem.splitlines()[0][:500])
    return str(grammar)


def compiled_grammar(schema: dict[str, Any], tokenizer: Any) -> str:
    """`grammar_for`, remembered for the schemas asked for most recently (an extraction
    adapter's schema comes with every request)."""
    return _compiled(json.dumps(schema, sort_keys=True), tokenizer)


@functools.lru_cache(maxsize=256)
def _compiled(schema: str, tokenizer: Any) -> str:
    return grammar_for(json.loads(schema), tokenizer)


@functools.cache
def vocabulary(tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face tokenizer, built once per tokenizer (~0.3 s)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer)


class SchemaConstrained(LogitsProcessor):
    """A logits processor for `generate`: the rows with a grammar are held to it, the others
    (None) decode freely, so constrained and free requests share one batch."""

    def __init__(self, tokenizer: Any, grammars: list[str | None]) -> None:
        import llguidance
        import llguidance.torch

        self._fill = llguidance.torch.fill_next_token_bitmask
        self._apply = llguidance.torch.apply_token_bitmask_inplace
        vocab = vocabulary(tokenizer)
        self.matchers = [None if g is None else llguidance.LLMatcher(vocab, g) for g in grammars]
        self.rows = [i for i, m in enumerate(self.matchers) if m is not None]
        self.mask = llguidance.torch.allocate_token_bitmask(len(grammars), vocab.vocab_size)
        self._started = False
        self.eos = tokenizer.eos_token_id

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._started:  # the token picked last step, which the matcher has not seen
            newest = input_ids[:, -1].tolist()
            for row in self.rows:
                matcher = self.matchers[row]
                if matcher is not None and not matcher.is_stopped():
                    matcher.consume_token(newest[row])
        self._started = True
        for row in self.rows:
            matcher = self.matchers[row]
            if matcher is None:
                continue
            if matcher.is_stopped():  # the document is complete: only the end of turn
                scores[row] = float("-inf")
                scores[row, self.eos] = 0.0
                continue
            self._fill(matcher, self.mask, row)
            self._apply(scores[row], self.mask[row])
        return scores
