"""Prefix caching: the key/value cache of the tokens every prompt of a model starts with.

Every classification prompt of an adapter begins with the same tokens: the chat template's head
and the task's system prompt (and, for few-shot scoring, the same examples). Computing them
once and starting each request after them is what vLLM calls automatic prefix caching. Here
the shared head is found from the prompts themselves (their longest common token prefix, which
only ever shrinks), so no template is parsed and no tokenisation boundary is assumed: two
prompts share exactly the tokens they share, and a causal model's keys and values for those
tokens are the same whatever follows them.

A cache belongs to one model state (base model plus one active adapter). Whoever owns the
model drops it when that state changes (an adapter loaded or unloaded under the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MIN_TOKENS = 8
"""A shorter common head is not worth a cache (the pass is mostly per-row work)."""
MAX_TOKENS = 4096
"""A longer one is cut: its keys and values stay in memory for the model state's life."""


@dataclass(frozen=True)
class Prefix:
    """Keys and values of `tokens` (batch of one) for one model state."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Per decoder layer, (keys, values) shaped (1, heads, len(tokens), head_dim)."""


def common_length(prompts: list[list[int]] | list[tuple[int, ...]]) -> int:
    """Tokens every prompt starts with."""
    shortest = min(len(p) for p in prompts)
    for i in range(shortest):
        token = prompts[0][i]
        if any(p[i] != token for p in prompts):
            return i
    return shortest


def encode(model: Any, tokens: tuple[int, ...]) -> Prefix | None:
    """Run `tokens` once and keep their keys and values; None for a model whose cache is not
    plain per-layer keys and values (sliding windows, recurrent state): those run uncached."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache):
        return None
    layers = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            return None
        layers.append((layer.keys, layer.values))
    return Prefix(tokens, tuple(layers))


def logits_after(
    model: Any, prefix: Prefix, batch: dict[str, torch.Tensor], keep: int = 1
) -> torch.Tensor:
    """Logits at the last `keep` positions of each row of a left-padded batch of the prompts'
    remainders, every prompt being `prefix.tokens` + its remainder: the same numbers as running
    the whole prompts, without computing the prefix again for each row. Autograd passes through
    the prefix's keys and values (training sums each row's gradient into them). Shape (rows,
    keep, vocab), on the model's device."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    rows = batch["input_ids"].shape[0]
    head = len(prefix.tokens)
    cache = DynamicCache(
        ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                        for k, v in prefix.layers]
    )  # fmt: skip
    mask = batch["attention_mask"].to(device)
    positions = head + (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=torch.cat(
            [torch.ones(rows, head, dtype=mask.dtype, device=device), mask], -1
        ),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits


def logprobs_after(model: Any, prefix: Prefix, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities at the last position of each row (see logits_after). Shape (rows,
    vocab), on the CPU."""
    return logits_after(model, prefix, batch)[:, -1].float().log_softmax(-1).cpu()


class PrefixCache:
    """One cached head per model state key (an adapter version), learned from its prompts."""

    def __init__(self, min_tokens: int = MIN_TOKENS, max_tokens: int = MAX_TOKENS) -> None:
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self._heads: dict[str, Prefix] = {}
        self._last: dict[str, tuple[int, ...]] = {}
        self.encoded = 0
        """Heads computed (a new key, or a head that had to shrink)."""
        self.unsupported = False
        """The model's cache is not plain keys and values: every prompt runs whole."""

    def head(self, key: str, prompts: list[list[int]], model: Any) -> Prefix | None:
        """The cached head every one of `prompts` starts with and goes beyond, computed now
        if needed with `model` in `key`'s state; None when they share too little. The head is
        the common prefix of these prompts, the key's previous prompt and its cached head."""
        if self.unsupported:
            return None
        known = self._heads.get(key)
        seen = [tuple(p) for p in prompts]
        if key in self._last:
            seen.append(self._last[key])
        if known is not None:
            seen.append(known.tokens)
        self._last[key] = tuple(prompts[-1])
        if len(seen) < 2:
            return None
        length = min(common_length(seen), min(len(p) for p in prompts) - 1, self.max_tokens)
        if length < self.min_tokens:
            return None
        if known is not None and len(known.tokens) == length:
            return known
        prefix = encode(model, tuple(prompts[0][:length]))
        if prefix is None:
            self.unsupported = True
            return None
        self._heads[key] = prefix
        self.encoded += 1
        return prefix

    def drop(self, key: str) -> None:
        """Forget `key`'s head: its model state changed."""
        self._heads.pop(key, None)
        self._last.pop(key, None)
