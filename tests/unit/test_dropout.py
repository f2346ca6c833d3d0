"""LoRA dropout drawn from seeds: the same dropout as torch's (rate, scale, gradient), fixed by
torch.manual_seed, the same masks when activation checkpointing recomputes a layer, and in
place of torch's in every LoRA layer a job trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from sectune.config import JobSpec
from sectune.training.dropout import SeededDropout
from sectune.training.train import wrap_with_lora


def test_it_drops_at_rate_p_and_scales_what_it_keeps():
    torch.manual_seed(0)
    dropout = SeededDropout(0.05)
    out = dropout(torch.ones(1000, 1000))
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.05) < 0.002
    assert torch.allclose(out[kept], torch.tensor(1 / 0.95))
    # Different masks for the next call and across rows (not one mask repeated).
    assert not torch.equal(dropout(torch.ones(1000, 1000)) != 0, kept)
    assert not torch.equal(kept[0], kept[1])


def test_its_gradient_is_the_mask_it_applied():
    torch.manual_seed(1)
    x = torch.randn(64, 96, requires_grad=True)
    y = SeededDropout(0.3)(x)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    mask = torch.where(y != 0, 1 / 0.7, 0.0)
    assert x.grad is not None
    assert torch.allclose(x.grad, upstream * mask)
    assert 0.25 < (y == 0).float().mean().item() < 0.35


def test_torch_manual_seed_fixes_the_masks_and_eval_is_the_identity():
    x = torch.randn(32, 48)
    dropout = SeededDropout(0.5)
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_checkpointed_recomputation_gets_the_same_gradients():
    layer = torch.nn.Linear(48, 48)
    dropout = SeededDropout(0.2)
    x = torch.randn(16, 48)

    def grads(checkpointed: bool) -> torch.Tensor:
        layer.zero_grad()
        torch.manual_seed(3)
        block = lambda h: layer(dropout(h)).relu()  # noqa: E731
        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        out.sum().backward()
        assert layer.weight.grad is not None
        return layer.weight.grad.clone()

    assert torch.equal(grads(True), grads(False))


def test_it_refuses_a_rate_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"got 1\.0"):
        SeededDropout(1.0)


@pytest.mark.parametrize("rate", [0.1, 0.0])
def test_every_lora_layer_a_job_trains_uses_it(tiny_model_dir: Path, rate: float):
    from transformers import AutoModelForCausalLM

    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t.jsonl"},
            "task": {"type": "generation"},
            "method": {"type": "lora", "dropout": rate},
        }
    )
    model = wrap_with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec)
    dropouts = [
        d for name, d in model.named_modules() if ".lora_dropout." in name and "default" in name
    ]
    assert dropouts
    if rate:
        assert all(isinstance(d, SeededDropout) and d.p == rate for d in dropouts)
    else:  # peft's identity: nothing drawn at all
        assert all(isinstance(d, torch.nn.Identity) for d in dropouts)
