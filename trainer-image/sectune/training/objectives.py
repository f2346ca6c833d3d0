"""What a training step minimises: one class per `task.head`, each turning examples into
batches and batches into a loss. Training and validation loss use the same objective.

    lm          next-token cross-entropy on the target tokens (every task type)
    classifier  cross-entropy over the label set at the end of the prompt (classification)

The classifier head is the language model's output layer restricted to the labels' first
tokens: the rows of the LM head for those tokens are the classification weights (a verbalizer
head). Training optimises exactly what evaluation and serving compute (`scoring.score_labels`,
`/v1/classify` renormalise the same logits over the label set), the adapter stays a plain
LoRA adapter on the causal LM (served next to generative adapters on one base), and a step
runs on the prompt alone, with logits at one position.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sectune.config import JobSpec
from sectune.data.example import Example
from sectune.data.format import (
    IGNORE,
    Encoded,
    PromptFormatter,
    first_tokens_distinct,
    fit_prompt,
    label_token_ids,
)


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of token ids padded on the left into one batch (the last position is each row's
    own): what training, evaluation and serving all feed the model."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


class Objective(Protocol):
    def encode(self, example: Example) -> Encoded | None:
        """Token ids and what the loss compares them with; None: dropped (too long)."""
        ...

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean loss of the batch and how many targets it covered."""
        ...


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad so every target ends at the last position (logits are kept only there)."""
    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, encoded in enumerate(batch):
        n = len(encoded.input_ids)
        ids[row, length - n :] = torch.tensor(encoded.input_ids)
        labels[row, length - n :] = torch.tensor(encoded.labels)
        mask[row, length - n :] = 1
    weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}
    if any(e.positions is not None for e in batch):  # packed: each example from position 0
        positions = torch.zeros((len(batch), length), dtype=torch.long)  # a pad is on its own
        for row, encoded in enumerate(batch):
            n = len(encoded.input_ids)
            positions[row, length - n :] = torch.tensor(encoded.positions or range(n))
        out["position_ids"] = positions
    return out


def balanced_weights(examples: list[Example]) -> dict[str, float]:
    """n / (labels x examples of the label): scikit-learn's class_weight="balanced"."""
    counts = Counter(e.target for e in examples)
    return {label: len(examples) / (len(counts) * n) for label, n in counts.items()}


def _forward(model: Any, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits at the last `keep` positions of a left-padded batch."""
    packed = "position_ids" in batch
    # Packed rows go without an attention mask: transformers then masks by the restarting
    # position ids (block-diagonal causal attention; examples and pads each see only
    # themselves), which it does only when no key/value cache is built either.
    positions = (
        batch["position_ids"] if packed else (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    )
    return model(
        input_ids=batch["input_ids"],
        attention_mask=None if packed else batch["attention_mask"],
        position_ids=positions,
        logits_to_keep=keep,
        use_cache=False,
    ).logits


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy on target tokens, computing logits only for the positions that predict
    them (the LM head is a large share of a small model's FLOPs)."""
    labels = batch["labels"]
    target_span = int((labels != IGNORE).int().argmax(dim=1).min().item())
    # Positions from one before the first target to the end; the very first token of a
    # sequence is never a target (nothing predicts it).
    keep = min(labels.shape[1] - target_span + 1, labels.shape[1])
    logits = _forward(model, batch, keep).float()
    # Position t predicts token t + 1: shift the labels, not the logits (a slice of the
    # logits would be copied whole by the reshape below); the last position predicts nothing.
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)[:, -keep:]
    counted = targets != IGNORE
    tokens = int(counted.sum().item())
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    # Each example's tokens count with its weight (all 1 unless task.classWeights).
    weights = batch.get("weights", torch.ones(len(targets), device=targets.device))
    row_weights = weights.to(per_token.device).unsqueeze(1) * counted
    return (per_token * row_weights).sum() / row_weights.sum().clamp(min=1e-9), tokens


@dataclass
class NextToken:
    """task.head: lm (and every generative task)."""

    formatter: PromptFormatter
    weights: dict[str, float] = field(default_factory=dict)

    def encode(self, example: Example) -> Encoded | None:
        encoded = self.formatter.encode(example)
        if encoded is not None:
            encoded.weight = self.weights.get(example.target, 1.0)
        return encoded

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(batch, pad_id)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(model, batch)


class LabelsShareFirstToken(ValueError):
    """task.head: classifier needs each label to start with a token of its own."""


@dataclass
class LabelHead:
    """task.head: classifier. `Encoded.labels` holds one item: the label's index."""

    formatter: PromptFormatter
    labels: list[str]
    label_tokens: list[int]
    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        formatter: PromptFormatter,
        labels: list[str],
        example: Example,
        weights: dict[str, float],
    ) -> LabelHead:
        ids = label_token_ids(formatter, example, labels)
        if not first_tokens_distinct(ids):
            first: dict[int, str] = {}
            for label, tokens in zip(labels, ids, strict=True):
                if tokens[0] in first:
                    raise LabelsShareFirstToken(
                        f"task.head: classifier: labels {first[tokens[0]]!r} and {label!r} start "
                        f"with the same token ({formatter.tokenizer.decode([tokens[0]])!r}) for "
                        "this tokenizer; rename one of them or use head: lm"
                    )
                first[tokens[0]] = label
        return cls(formatter, labels, [tokens[0] for tokens in ids], weights)

    def encode(self, example: Example) -> Encoded | None:
        prompt = self.formatter.prompt_ids(example)
        truncated = len(prompt) > self.formatter.max_length
        if truncated:
            if self.formatter.spec.dataset.on_too_long == "drop":
                return None
            prompt = fit_prompt(prompt, self.formatter.max_length)
        weight = self.weights.get(example.target, 1.0)
        return Encoded(prompt, [self.labels.index(example.target)], truncated, weight)

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        classes = torch.tensor([e.labels[0] for e in batch], dtype=torch.long)
        weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)
        padded = left_pad([e.input_ids for e in batch], pad_id)
        return {**padded, "classes": classes, "weights": weights}

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = _forward(model, batch, 1)[:, -1, self.label_tokens].float()
        classes = batch["classes"]
        per_example = torch.nn.functional.cross_entropy(logits, classes, reduction="none")
        weights = batch["weights"].to(per_example.device)
        return (per_example * weights).sum() / weights.sum(), int(classes.numel())


def objective_for(
    tokenizer: Any, spec: JobSpec, examples: list[Example], *, weighted: bool = False
) -> Objective:
    """The objective `spec` asks for. `examples`: the ones it will see (label tokens are
    rendered from the first); `weighted`: weigh them as task.classWeights says (training; a
    held-out loss counts every example once)."""
    formatter = PromptFormatter(tokenizer, spec)
    task = spec.task
    weights = (
        balanced_weights([e for e in examples if not e.canary])
        if weighted and task.type == "classification" and task.class_weights == "balanced"
        else {}
    )
    if task.type == "classification" and task.head == "classifier" and examples:
        return LabelHead.build(formatter, task.labels, examples[0], weights)
    return NextToken(formatter, weights)
