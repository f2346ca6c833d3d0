"""Training objectives on a tiny random Llama: the classifier head's loss is cross-entropy over
the label set of exactly the logits evaluation scores, labels that share a first token are
refused by name, and a few steps of the classifier objective move the scored predictions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sectune.config import JobSpec
from sectune.data.example import Example
from sectune.evaluation.scoring import score_labels, validation_loss
from sectune.training.objectives import LabelHead, LabelsShareFirstToken, NextToken, objective_for

LABELS = ["low", "high"]


def _spec(**task: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t.jsonl"},
            "task": {"labels": LABELS, "head": "classifier", **task},
            "hyperparameters": {"maxSeqLength": 64},
        }
    )


def _examples() -> list[Example]:
    texts = [
        ("Failed password for invalid user admin", "high"),
        ("Accepted publickey for deploy", "low"),
        ("Credential dumping with Mimikatz", "high"),
        ("benign informational message", "low"),
    ]
    return [Example(f"e{i}", {"text": t}, label) for i, (t, label) in enumerate(texts)]


@pytest.fixture
def model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def test_the_classifier_loss_is_cross_entropy_over_the_scored_label_logits(model, tiny_tokenizer):
    spec = _spec()
    examples = _examples()
    objective = objective_for(tiny_tokenizer, spec, examples)
    assert isinstance(objective, LabelHead)
    batch = objective.collate(
        [e for e in map(objective.encode, examples) if e], tiny_tokenizer.pad_token_id
    )
    with torch.no_grad():
        loss, count = objective.loss(model, batch)
    scored = score_labels(model, tiny_tokenizer, examples, spec, autocast=False)
    truth = torch.tensor([LABELS.index(e.target) for e in examples])
    expected = torch.nn.functional.nll_loss(torch.tensor(scored.probabilities).log(), truth)
    assert count == len(examples)
    assert float(loss) == pytest.approx(float(expected), abs=1e-4)
    assert validation_loss(model, tiny_tokenizer, examples, spec) == pytest.approx(
        float(expected), abs=1e-4
    )


def test_the_lm_head_keeps_next_token_loss(tiny_tokenizer):
    assert isinstance(objective_for(tiny_tokenizer, _spec(head="lm"), _examples()), NextToken)


def test_the_lm_loss_is_the_models_own_loss_on_the_answer_tokens(model, tiny_tokenizer):
    """Left-padded, logits only from the first answer position on: the same number as the
    model's loss on the unpadded rows with the prompts masked, averaged over answer tokens."""
    spec = _spec(head="lm")
    examples = _examples()
    objective = objective_for(tiny_tokenizer, spec, examples)
    encoded = [e for e in map(objective.encode, examples) if e]
    with torch.no_grad():
        loss, count = objective.loss(model, objective.collate(encoded, tiny_tokenizer.pad_token_id))
        total, tokens = 0.0, 0
        for item in encoded:
            ids, labels = torch.tensor([item.input_ids]), torch.tensor([item.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            tokens += n
    assert count == tokens
    assert float(loss) == pytest.approx(total / tokens, abs=1e-4)


def test_packed_examples_train_as_if_each_were_alone(model, tiny_tokenizer):
    """hyperparameters.packing: examples share a sequence but not their attention or
    positions, so the packed batch's loss is the loss of the same examples one by one."""
    from sectune.training.train import pack

    spec = _spec(head="lm")
    examples = _examples()
    objective = objective_for(tiny_tokenizer, spec, examples)
    encoded = [e for e in map(objective.encode, examples) if e]
    packed = pack(encoded, sum(len(e.input_ids) for e in encoded))  # one sequence
    assert len(packed) == 1
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        alone, _ = objective.loss(model, objective.collate(encoded, pad))
        together, _ = objective.loss(model, objective.collate(packed, pad))
    assert float(together) == pytest.approx(float(alone), abs=1e-4)


def test_labels_sharing_a_first_token_are_refused_by_name(tiny_tokenizer):
    labels = ["high", "higher"]
    with pytest.raises(LabelsShareFirstToken, match=r"'high' and 'higher'.*head: lm"):
        objective_for(tiny_tokenizer, _spec(labels=labels), _examples())


def test_classifier_steps_move_predictions_towards_the_labels(model, tiny_tokenizer):
    spec = _spec()
    examples = _examples()
    objective = objective_for(tiny_tokenizer, spec, examples)
    batch = objective.collate([objective.encode(e) for e in examples], tiny_tokenizer.pad_token_id)  # type: ignore[misc]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = validation_loss(model, tiny_tokenizer, examples, spec)
    model.train()
    for _ in range(20):
        loss, _count = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = validation_loss(model, tiny_tokenizer, examples, spec)
    predicted = score_labels(model, tiny_tokenizer, examples, spec, autocast=False).predictions(
        LABELS
    )
    assert after < before / 4
    assert predicted == [e.target for e in examples]


def test_balanced_class_weights_count_rare_labels_as_much_as_common_ones(model, tiny_tokenizer):
    examples = [*_examples(), Example("e9", {"text": "Mimikatz again"}, "high")]  # 3 high, 2 low
    spec = _spec(classWeights="balanced")
    weighted = objective_for(tiny_tokenizer, spec, examples, weighted=True)
    encoded = [weighted.encode(e) for e in examples]
    assert [e.weight for e in encoded if e] == pytest.approx([5 / 6, 5 / 4, 5 / 6, 5 / 4, 5 / 6])
    batch = weighted.collate([e for e in encoded if e], tiny_tokenizer.pad_token_id)
    assert isinstance(weighted, LabelHead)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        loss, _ = weighted.loss(model, batch)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions,
        ).logits
    per_example = torch.nn.functional.cross_entropy(
        logits[:, -1, weighted.label_tokens], batch["classes"], reduction="none"
    )
    weights = batch["weights"]
    assert float(loss) == pytest.approx(
        float((per_example * weights).sum() / weights.sum()), abs=1e-4
    )
    assert float(loss) != pytest.approx(float(per_example.mean()), abs=1e-4)
    # Unweighted (a held-out loss): every example counts once.
    assert objective_for(tiny_tokenizer, spec, examples).encode(examples[0]).weight == 1.0  # type: ignore[union-attr]

    lm = objective_for(
        tiny_tokenizer, _spec(head="lm", classWeights="balanced"), examples, weighted=True
    )
    assert lm.encode(examples[1]).weight == pytest.approx(5 / 4)  # type: ignore[union-attr]


def test_class_weights_are_refused_outside_classification():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"task.classWeights is only for type classification"):
        JobSpec.model_validate(
            {
                "baseModel": {"uri": "file:///m"},
                "dataset": {"train": "file:///t.jsonl", "format": "instruction"},
                "task": {"type": "generation", "classWeights": "balanced"},
            }
        )


def test_length_grouped_batches_keep_every_example_and_cut_padding():
    import random

    from sectune.training.train import length_grouped

    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    grouped = length_grouped(order, lengths, per_step=8, seed=1)

    def padding(sequence: list[int]) -> int:
        steps = [sequence[i : i + 8] for i in range(0, len(sequence), 8)]
        return sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in steps)

    assert sorted(grouped) == list(range(1000))
    assert padding(grouped) < padding(order) / 5
    # The steps of a window are shuffled, not served shortest first.
    first_window = [max(lengths[i] for i in grouped[k : k + 8]) for k in range(0, 128, 8)]
    assert first_window != sorted(first_window)


def test_only_classification_batches_are_grouped_by_length():
    """Generation batches stay shuffled: grouping them by length put one log format in each
    batch and tripled the held-out loss on log parsing (BENCHMARKS.md)."""
    import random

    from sectune.training.train import epoch_order, groups_by_length

    generation = JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///m"},
            "dataset": {"train": "file:///t.jsonl", "format": "instruction"},
            "task": {"type": "generation"},
        }
    )
    assert groups_by_length(_spec()) and not groups_by_length(generation)
    lengths = [random.Random(i).randint(20, 200) for i in range(256)]
    shuffled = epoch_order(lengths, per_step=8, seed=3, grouped=False)
    grouped = epoch_order(lengths, per_step=8, seed=3, grouped=True)
    assert sorted(shuffled) == sorted(grouped) == list(range(256))
    expected = list(range(256))
    random.Random(3).shuffle(expected)
    assert shuffled == expected and grouped != shuffled


@pytest.mark.parametrize("head", ["classifier", "lm"])
def test_a_shared_prefix_gives_the_loss_and_gradients_of_the_whole_rows(
    model, tiny_tokenizer, head
):
    """The rows' common head computed once per batch: the same loss, and the same gradient on
    every LoRA weight (each row's gradient summed into the one prefix pass), as the whole
    rows; tokens counted as if every row held its head."""
    from peft import LoraConfig, get_peft_model

    from sectune.training.objectives import batch_tokens

    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                      init_lora_weights=False)  # fmt: skip
    tuned = get_peft_model(model, lora)
    spec = _spec(head=head, systemPrompt="Rate the alert's severity.")
    examples = _examples()
    objective = objective_for(tiny_tokenizer, spec, examples)
    encoded = [e for e in map(objective.encode, examples) if e]

    def run(share: bool) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        objective.share_prefix = share
        batch = objective.collate(encoded, tiny_tokenizer.pad_token_id)
        tuned.zero_grad()
        loss, _ = objective.loss(tuned, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}
        return float(loss.detach()), grads, batch

    whole_loss, whole_grads, whole = run(False)
    shared_loss, shared_grads, shared = run(True)
    assert "prefix_ids" not in whole
    assert len(shared["prefix_ids"]) >= 8  # the template's head: computed once, not 4 times
    assert shared["input_ids"].shape[1] == whole["input_ids"].shape[1] - len(shared["prefix_ids"])
    assert batch_tokens(shared) == batch_tokens(whole) == sum(len(e.input_ids) for e in encoded)
    assert shared_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole_grads.keys() == shared_grads.keys() and len(whole_grads) > 0
    for name, grad in whole_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6)
