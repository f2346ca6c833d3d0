"""Two ways a training step on a CPU gets cheaper without changing what it computes.

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
forward pass: autocast keeps casts only of weights that require gradients, and a step of the
shared-head objective runs two passes. For the loop, the LoRA-adapted base layers hold their
weights in bf16 - the very values autocast would compute - and get their float32 tensors back
when it ends: the same products bit for bit, less copying (and about half a base weight copy
more memory while it runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

EAGER_ATTENTION_MAX_KEYS = 512
"""Longest rows (positions attended to, a shared head included) that run eager attention."""


def transformers_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper, or `model` itself."""
    inner = getattr(model, "get_base_model", None)
    return inner() if callable(inner) else model


@contextmanager
def attention_by_length(model: Any, device_type: str) -> Iterator[Callable[[int], None]]:
    """Yields `use_for(keys)`, which sets the attention kernel for a batch whose rows attend to
    `keys` positions (see the module docstring); no-op off the CPU or for a model not on sdpa."""
    inner = transformers_model(model)
    original = inner.config._attn_implementation
    current = {"kernel": original}

    def use_for(keys: int) -> None:
        wanted = "eager" if keys <= EAGER_ATTENTION_MAX_KEYS else "sdpa"
        if wanted != current["kernel"]:
            inner.set_attn_implementation(wanted)
            current["kernel"] = wanted

    if device_type != "cpu" or original != "sdpa":
        yield lambda keys: None
        return
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
