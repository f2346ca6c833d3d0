"""Three ways a training step on a CPU gets cheaper without changing what it computes.

Attention. torch's fused CPU attention (transformers' `sdpa`) is fast forward and slow backward
on short rows: one layer's forward and backward (bf16, 9 query and 3 key/value heads of 64, a
shared head of 18 positions, on the 2-core development machine) took

    keys per row (rows)    30 (8)   64 (8)   128 (8)   256 (8)   512 (4)   1024 (2)
    sdpa                   3.7 ms   6.2 ms   17.0 ms   32.7 ms   60.1 ms   79.0 ms
    eager                  0.9 ms   2.0 ms    7.0 ms   30.3 ms   43.4 ms  146.4 ms

so a batch whose rows attend to at most EAGER_ATTENTION_MAX_KEYS positions runs transformers'
`eager` attention (matmuls and a float32 softmax: the same maths), a longer one sdpa. Only a
model loaded with sdpa is switched, and it gets sdpa back when training ends.

Frozen weights. Under bf16 autocast each linear layer casts its float32 weight to bf16 at every
forward pass: autocast keeps casts only of weights that require gradients. For the loop, the
LoRA-adapted base layers hold their weights in bf16 - the very values autocast would compute -
and get their float32 tensors back when it ends: the same products bit for bit, less copying
(and about half a base weight copy more memory while it runs).

One pass for a batch's shared head. The rows of a batch that share their first tokens (the chat
template's head and the system prompt; training/objectives.py) run as one flat sequence: the
head once, then every row's own tokens, with no padding. Every linear layer then multiplies one
matrix of all the batch's tokens, and attention (SHARED_HEAD_KERNEL) lets the head attend to
itself causally and each row to the head and, causally, to itself - the same attention the whole
rows get. Elsewhere (and on GPUs) the head runs as a batch-1 pass whose keys and values the rows
attend to (sectune.evaluation.prefix); on a CPU that second pass through every layer cost a third
of a classification step for 18 of its ~240 tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

EAGER_ATTENTION_MAX_KEYS = 512
"""Longest rows (positions attended to, a shared head included) that run eager attention."""


def transformers_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


SHARED_HEAD_KERNEL = "sectune_shared_head"
"""The attention implementation a model runs a flat shared-head batch with (registered below)."""

PLAIN_ATTENTION = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose attention is softmax(q k^T * scaling + mask) v over every position (no
soft-capping or attention sinks), which SHARED_HEAD_KERNEL computes."""


def flat_head_supported(model: Any) -> bool:
    """SHARED_HEAD_KERNEL computes this model's attention: plain softmax attention over every
    position (no sliding window)."""
    config = model.config
    return config.model_type in PLAIN_ATTENTION and getattr(config, "sliding_window", None) is None


@contextmanager
def attention_by_length(model: Any, device_type: str) -> Iterator[Callable[[int, bool], None]]:
    """Yields `use_for(keys, shared_head)`, which sets the attention kernel for a batch whose
    rows attend to `keys` positions, or whose shared head runs in the same pass (see the module
    docstring); no-op off the CPU or for a model not on sdpa."""
    inner = transformers_model(model)
    original = inner.config._attn_implementation
    current = {"kernel": original}
    active = device_type == "cpu" and original == "sdpa"
    flat = flat_head_supported(inner)

    def use_for(keys: int, shared_head: bool = False) -> None:
        if not active:
            return
        if shared_head and flat:
            wanted = SHARED_HEAD_KERNEL
        else:
            wanted = "eager" if keys <= EAGER_ATTENTION_MAX_KEYS else "sdpa"
        if wanted != current["kernel"]:
            inner.set_attn_implementation(wanted)
            current["kernel"] = wanted

    try:
        yield use_for
    finally:
        if current["kernel"] != original:
            inner.set_attn_implementation(original)


def frozen_base_layers(model: Any) -> list[torch.nn.Linear]:
    """The float32 linear layers under LoRA adapters whose weights no other module shares and
    nothing trains."""
    from peft.tuners.lora import LoraLayer

    uses: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        uses[id(parameter)] = uses.get(id(parameter), 0) + 1
    return [
        module.base_layer
        for module in model.modules()
        if isinstance(module, LoraLayer)
        and isinstance(module.base_layer, torch.nn.Linear)
        and module.base_layer.weight.dtype == torch.float32
        and not module.base_layer.weight.requires_grad
        and uses[id(module.base_layer.weight)] == 1
    ]


@contextmanager
def frozen_weights_in_bf16(model: Any, enabled: bool) -> Iterator[None]:
    """While it is open, the frozen base layers under LoRA hold bf16 weights (see the module
    docstring); their float32 weights are put back when it closes, whatever happened."""
    layers = frozen_base_layers(model) if enabled else []
    originals = [layer.weight.data for layer in layers]
    for layer in layers:
        layer.weight.data = layer.weight.data.to(torch.bfloat16)
    try:
        yield
    finally:
        for layer, weight in zip(layers, originals, strict=True):
            layer.weight.data = weight


@dataclass(frozen=True)
class FlatHead:
    """Where a batch's tokens sit in its flat sequence: `head` tokens, then each row's own
    tokens in order. `slots[i, j]` is the flat position of the row's j-th (left-padded) token
    (0 for a pad, which `valid` marks False); `mask` (rows, 1, width, head + width) is the
    rows' additive attention mask over the head's keys and their own, `head_mask` the head's
    causal one over itself. Built once per batch, used by every layer."""

    head: int
    slots: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    head_mask: torch.Tensor
    order: torch.Tensor
    """Where, among the rows' slots read row by row, each row's real tokens are, in flat order."""

    @classmethod
    def of(cls, head: int, attention_mask: torch.Tensor) -> FlatHead:
        valid = attention_mask.bool()
        rows, width = valid.shape
        slots = torch.zeros(rows, width, dtype=torch.long, device=valid.device)
        slots[valid] = head + torch.arange(int(valid.sum()), device=valid.device)
        causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()
        own = causal & valid[:, None, :]  # row i, query j sees its own valid keys up to j
        # a pad query sees the head (its output is never used; no row of -inf, no NaN)
        sees = torch.cat([valid.new_ones(rows, width, head), own], dim=-1)
        mask = torch.zeros(sees.shape, dtype=torch.float32, device=valid.device)
        mask.masked_fill_(~sees, torch.finfo(torch.float32).min)
        order = valid.reshape(-1).nonzero().squeeze(1)
        head_mask = torch.full((head, head), torch.finfo(torch.float32).min, device=valid.device)
        # one mask for every attention head
        return cls(head, slots, valid, mask[:, None], head_mask.triu(1), order)


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
            scaling: float) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T * scaling + mask) v, keys and values shared by groups of query heads (as
    the models' own eager attention computes it: scores in the inputs' type, softmax in
    float32). In (batch, heads, positions, dim); out (batch, positions, heads, dim)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if key.shape[-2] > EAGER_ATTENTION_MAX_KEYS:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask.to(query.dtype), scale=scaling
        )
    else:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(weights, value)
    return out.transpose(1, 2)


def shared_head_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    flat_head: FlatHead | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """SHARED_HEAD_KERNEL: attention over a flat shared-head batch (FlatHead), in and out in
    the model's shapes: (1, heads, positions, dim) in, (1, positions, heads, dim) out."""
    if flat_head is None or dropout:
        raise ValueError(f"{SHARED_HEAD_KERNEL}: only for a flat shared-head batch, no dropout")
    head, slots = flat_head.head, flat_head.slots
    rows = slots.shape[0]

    def per_row(states: torch.Tensor) -> torch.Tensor:  # (1, h, T, d) -> (rows, h, width, d)
        gathered = states[0].index_select(1, slots.reshape(-1))
        return gathered.unflatten(1, slots.shape).transpose(0, 1)

    def with_head(states: torch.Tensor) -> torch.Tensor:  # the head's keys, then the row's
        return torch.cat([states[:, :, :head].expand(rows, -1, -1, -1), per_row(states)], dim=2)

    head_out = _attend(
        query[:, :, :head], key[:, :, :head], value[:, :, :head], flat_head.head_mask, scaling
    )
    rows_out = _attend(per_row(query), with_head(key), with_head(value), flat_head.mask, scaling)
    own = rows_out.flatten(0, 1).index_select(0, flat_head.order)  # each row's real tokens
    return torch.cat([head_out[0], own])[None], None


def forward_with_flat_head(model: Any, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits at the last `keep` positions of each row of a shared-head batch (rows
    left-padded, their head in `prefix_ids`), from one pass over the flat sequence; shape
    (rows, keep, vocab), as sectune.evaluation.prefix.logits_after gives them."""
    device = batch["input_ids"].device
    head = batch["prefix_ids"].to(device)
    flat = FlatHead.of(len(head), batch["attention_mask"].to(device))
    ids = torch.cat([head, batch["input_ids"][flat.valid]])
    own = (flat.valid.cumsum(-1) - 1)[flat.valid]
    positions = torch.cat([torch.arange(len(head), device=device), len(head) + own])
    wanted = flat.slots[:, -keep:]
    logits = model(
        input_ids=ids[None],
        position_ids=positions[None],
        use_cache=False,
        logits_to_keep=wanted.reshape(-1),
        flat_head=flat,
    ).logits
    return logits.view(*wanted.shape, -1)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_HEAD_KERNEL, shared_head_attention)


_register()
