"""LoRA's dropout at a fraction of its cost on a CPU.

Every adapted linear layer drops out its whole input before the LoRA down-projection, and torch
draws each mask element on a CPU as one Bernoulli sample from its Mersenne Twister: measured on
a 2-core CPU, a third of a LoRA step of SmolLM2-135M goes there (BENCHMARKS.md, "LoRA dropout on
a CPU"). `SeededDropout` applies the same dropout - each element kept with probability 1 - p and
the kept ones scaled by 1 / (1 - p) - from 16 random bits per element, four elements to each
64-bit word of numpy's SFC64 generator. p is resolved to 1/65536.

It keeps a seed instead of the mask: backward draws the mask again, so it holds less memory than
torch's dropout, which saves its mask. Each seed is drawn from torch's generator, so
`torch.manual_seed` still fixes every mask, and activation checkpointing (which restores torch's
generator before it recomputes a layer) recomputes the same ones. On an accelerator torch's own
dropout runs: there its masks are cheap and a mask drawn on the host would have to be copied over.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

LEVELS = 1 << 16
"""Distinct values of the 16 bits drawn per element: p is resolved to 1/LEVELS."""


def keep_mask(seed: int, shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """0 where an element is dropped, 1 / (1 - p) where it is kept; the same for the same seed."""
    count = shape.numel()
    words = np.random.SFC64(seed).random_raw((count + 3) // 4)
    bits = torch.from_numpy(words.view(np.int16)[:count]).view(shape)  # uniform over int16
    dropped = round(p * LEVELS)  # the lowest `dropped` of the LEVELS values
    # Compared in float32: bfloat16 cannot hold every 16-bit value, and would shift p.
    kept = bits.to(torch.float32).ge_(-(LEVELS // 2) + dropped)
    return kept.mul_(1 / (1 - p)).to(dtype)


class _DropBySeed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, ()).item())
        ctx.seed, ctx.p = seed, p
        return x * keep_mask(seed, x.shape, p, x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * keep_mask(ctx.seed, grad.shape, ctx.p, grad.dtype), None


class SeededDropout(torch.nn.Module):
    """torch.nn.Dropout(p), with masks drawn as the module docstring says."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        return _DropBySeed.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_seeded_dropout(model: Any) -> None:
    """Put a SeededDropout in place of each LoRA layer's torch dropout (same p)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter, dropout in module.lora_dropout.items():
                if isinstance(dropout, torch.nn.Dropout):
                    module.lora_dropout[adapter] = SeededDropout(dropout.p)
