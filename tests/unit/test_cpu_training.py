"""Training on a CPU: eager attention on short batches, a batch's shared head in the same pass
as its rows, and bf16 copies of the frozen weights under bf16 autocast make a step cheaper and
leave what it computes as it was; the model comes out of training as it went in (sdpa, float32
base weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sectune.config import JobSpec
from sectune.data.example import Example
from sectune.training import cpu
from sectune.training.objectives import objective_for
from sectune.training.train import pack

TEXTS = [
    ("Failed password for invalid user admin", "high"),
    ("Accepted publickey for deploy", "low"),
    ("Credential dumping with Mimikatz", "high"),
    ("benign informational message", "low"),
]


def _spec(task: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t.jsonl"},
            "task": {"systemPrompt": "Rate the alert's severity.", **task},
            "hyperparameters": {"maxSeqLength": 256},
        }
    )


CASES = {
    # rows' common head once per batch, the rest left-padded (classification)
    "classifier, shared head": ({"labels": ["low", "high"], "head": "classifier"}, True, False),
    # whole rows, left-padded, logits over the answer
    "lm, whole rows": ({"labels": ["low", "high"], "head": "lm"}, False, False),
    # examples packed into one row, each attending only to itself
    "generation, packed": ({"type": "generation"}, False, True),
}


def _lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                      init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, lora)


def _batch(tokenizer: Any, case: str) -> tuple[Any, dict[str, torch.Tensor]]:
    task, share, packed = CASES[case]
    examples = [Example(f"e{i}", {"text": t}, label) for i, (t, label) in enumerate(TEXTS)]
    objective = objective_for(tokenizer, _spec(task), examples)
    objective.share_prefix = share
    encoded = [e for e in map(objective.encode, examples) if e]
    if packed:
        encoded = pack(encoded, 256)
    return objective, objective.collate(encoded, tokenizer.pad_token_id)


def _loss_and_grads(
    tuned: Any, objective: Any, batch: dict[str, torch.Tensor], autocast: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tuned.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = objective.loss(tuned, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return loss.detach(), grads


@pytest.fixture
def tuned(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config._attn_implementation == "sdpa"  # what a job loads
    return _lora(model)


@pytest.mark.parametrize("case", list(CASES))
def test_eager_attention_gives_sdpas_loss_and_gradients(tuned, tiny_tokenizer, case):
    objective, batch = _batch(tiny_tokenizer, case)
    sdpa_loss, sdpa_grads = _loss_and_grads(tuned, objective, batch)
    keys = batch["input_ids"].shape[1] + len(batch.get("prefix_ids", ()))
    with cpu.attention_by_length(tuned, "cpu") as use_for:
        use_for(keys)
        assert tuned.get_base_model().config._attn_implementation == "eager"
        eager_loss, eager_grads = _loss_and_grads(tuned, objective, batch)
    assert tuned.get_base_model().config._attn_implementation == "sdpa"
    torch.testing.assert_close(eager_loss, sdpa_loss, rtol=1e-5, atol=1e-6)
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(eager_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head", ["classifier", "lm"])
def test_a_shared_head_in_the_rows_pass_gives_the_whole_rows_loss_and_gradients(
    tuned, tiny_tokenizer, head
):
    """One flat pass (head once, then each row's own tokens) against the whole left-padded
    rows: the same loss and gradient on every LoRA weight."""
    task = {"labels": ["low", "high"], "head": head}
    examples = [Example(f"e{i}", {"text": t}, label) for i, (t, label) in enumerate(TEXTS)]
    objective = objective_for(tiny_tokenizer, _spec(task), examples)
    encoded = [e for e in map(objective.encode, examples) if e]
    whole_loss, whole_grads = _loss_and_grads(
        tuned, objective, objective.collate(encoded, tiny_tokenizer.pad_token_id)
    )
    objective.share_prefix = True
    batch = objective.collate(encoded, tiny_tokenizer.pad_token_id)
    assert len(batch["prefix_ids"]) >= 8
    with cpu.attention_by_length(tuned, "cpu") as use_for:
        use_for(batch["input_ids"].shape[1] + len(batch["prefix_ids"]), True)
        assert tuned.get_base_model().config._attn_implementation == cpu.SHARED_HEAD_KERNEL
        flat_loss, flat_grads = _loss_and_grads(tuned, objective, batch)
    torch.testing.assert_close(flat_loss, whole_loss, rtol=1e-5, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_the_flat_layout_puts_each_row_after_the_head_without_padding():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    flat = cpu.FlatHead.of(2, mask)
    assert flat.slots.tolist() == [[0, 2, 3], [4, 5, 6], [0, 0, 7]]
    seen = flat.mask[:, 0] == 0  # (rows, a query per slot, head + own keys)
    # row 0, its last token: both head keys, its own two tokens, not the pad
    assert seen[0, 2].tolist() == [True, True, False, True, True]
    # row 1, its first token: the head and itself only (causal)
    assert seen[1, 0].tolist() == [True, True, True, False, False]


def test_long_batches_and_other_devices_keep_sdpa(tuned):
    model = tuned.get_base_model()
    with cpu.attention_by_length(tuned, "cpu") as use_for:
        use_for(cpu.EAGER_ATTENTION_MAX_KEYS + 1)
        assert model.config._attn_implementation == "sdpa"
        use_for(cpu.EAGER_ATTENTION_MAX_KEYS)
        assert model.config._attn_implementation == "eager"
        use_for(cpu.EAGER_ATTENTION_MAX_KEYS + 1)
        assert model.config._attn_implementation == "sdpa"
    with cpu.attention_by_length(tuned, "cuda") as use_for:
        use_for(16)
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_frozen_weights_compute_what_autocast_does_bit_for_bit(tuned, tiny_tokenizer, case):
    objective, batch = _batch(tiny_tokenizer, case)
    layers = cpu.frozen_base_layers(tuned)
    assert len(layers) == 7 * 2  # every adapted linear layer of the 2 blocks; not the tied head
    before = [layer.weight.data_ptr() for layer in layers]
    autocast_loss, autocast_grads = _loss_and_grads(tuned, objective, batch, autocast=True)
    with cpu.frozen_weights_in_bf16(tuned, enabled=True):
        assert all(layer.weight.dtype == torch.bfloat16 for layer in layers)
        half_loss, half_grads = _loss_and_grads(tuned, objective, batch, autocast=True)
    assert torch.equal(half_loss, autocast_loss)
    for name, grad in autocast_grads.items():
        assert torch.equal(half_grads[name], grad), name
    # the very float32 tensors come back (the same memory, not a round trip through bf16)
    assert [layer.weight.data_ptr() for layer in layers] == before
    assert all(layer.weight.dtype == torch.float32 for layer in layers)


def test_the_float32_weights_come_back_when_a_step_fails(tuned):
    layers = cpu.frozen_base_layers(tuned)
    before = [layer.weight.data.clone() for layer in layers]
    with (
        pytest.raises(RuntimeError, match="preempted"),
        cpu.frozen_weights_in_bf16(tuned, enabled=True),
    ):
        raise RuntimeError("preempted")
    for layer, weight in zip(layers, before, strict=True):
        assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight)


def test_a_training_run_on_the_cpu_uses_both_and_returns_the_model_as_it_was(
    tiny_model_dir: Path, tmp_path: Path
):
    """What each forward pass of a real run saw (a hook on an adapted layer), and the model
    after it: sdpa again, the same float32 base weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune import storage
    from sectune.placement import Numerics
    from sectune.training.distributed import make_accelerator
    from sectune.training.train import Checkpoints, train, wrap_with_lora

    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{tiny_model_dir}"},
            "dataset": {"train": "file:///t.jsonl"},
            "task": {
                "labels": ["low", "high"],
                "head": "classifier",
                "systemPrompt": "Rate the alert's severity.",
            },
            "method": {"type": "lora", "r": 4},
            "hyperparameters": {"maxSteps": 3, "batchSize": 2, "precision": "bf16"},
            "resources": {"gpus": 0},
        }
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    accelerator = make_accelerator(spec, Numerics("cpu", "float32", "bfloat16"))
    tuned = wrap_with_lora(model, spec)
    layer = cpu.frozen_base_layers(tuned)[0]
    weight = layer.weight.data.clone()
    seen: list[tuple[torch.dtype, str]] = []
    layer.register_forward_hook(
        lambda module, _in, _out: seen.append(
            (module.weight.dtype, model.config._attn_implementation)
        )
    )
    examples = [Example(f"e{i}", {"text": t}, label) for i, (t, label) in enumerate(TEXTS)]
    checkpoints = Checkpoints(
        storage.parse_uri(f"file://{tmp_path}/job"), tmp_path, "fp", accelerator
    )
    result = train(tuned, tokenizer, examples, spec, accelerator, checkpoints)

    during = [kernel for dtype, kernel in seen if dtype == torch.bfloat16]
    assert len(during) >= 3 and set(during) <= {"eager", cpu.SHARED_HEAD_KERNEL}
    assert cpu.SHARED_HEAD_KERNEL in during  # the rows share the template's head
    assert model.config._attn_implementation == "sdpa"
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, weight)
    assert len(result.history) == 3
