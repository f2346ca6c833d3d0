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

Shared prefix: the rows of a batch start with the same tokens (the chat template's head and
the system prompt). With `share_prefix`, a batch carries those tokens once (`prefix_ids`) and
the rows without them; the forward pass computes the prefix for one row and every row attends
to its keys and values (sectune.evaluation.prefix), and the backward pass sums every row's
gradient into that one computation. The loss and the gradients are the ones the whole rows
give (a causal model's prefix states do not depend on what follows); what differs is that
LoRA dropout draws one mask for the prefix instead of one per row.
"""

from __future__ import annotations

import dataclasses
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
from sectune.evaluation import prefix
from sectune.training import cpu


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
    share_prefix: bool
    """Batches carry the rows' common head once (`prefix_ids`): see the module's docstring."""

    def encode(self, example: Example) -> Encoded | None:
        """Token ids and what the loss compares them with; None: dropped (too long)."""
        ...

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean loss of the batch and how many targets it covered."""
        ...


def shared_head(rows: list[list[int]], limit: int) -> int:
    """How many tokens every row starts with, when computing them once is worth it (two rows
    or more, at least prefix.MIN_TOKENS), at most `limit`; else 0."""
    if len(rows) < 2:
        return 0
    length = min(prefix.common_length(rows), limit)
    return length if length >= prefix.MIN_TOKENS else 0


def _split(batch: list[Encoded], limit: int) -> tuple[list[Encoded], list[int]]:
    """The rows without their shared head, and the head (empty when not worth sharing)."""
    length = shared_head([e.input_ids for e in batch], limit)
    if not length:
        return batch, []
    rest = [
        dataclasses.replace(e, input_ids=e.input_ids[length:], labels=e.labels[length:])
        for e in batch
    ]
    return rest, batch[0].input_ids[:length]


def with_head(out: dict[str, torch.Tensor], head: list[int]) -> dict[str, torch.Tensor]:
    if head:
        out["prefix_ids"] = torch.tensor(head, dtype=torch.long)
    return out


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the batch holds, its shared head counted in every row."""
    rows = batch["attention_mask"].shape[0]
    head = len(batch["prefix_ids"]) if "prefix_ids" in batch else 0
    return int(batch["attention_mask"].sum()) + rows * head


def collate(
    batch: list[Encoded], pad_id: int, share_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """Left-pad so every target ends at the last position (logits are kept only there).
    `share_prefix`: the rows' common head goes once into `prefix_ids`, up to the position
    that predicts the first target (packed rows share none)."""
    head: list[int] = []
    if share_prefix and all(e.positions is None for e in batch):
        first_target = min(
            next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels)) for e in batch
        )
        batch, head = _split(batch, first_target - 1)
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
    return with_head(out, head)


def balanced_weights(examples: list[Example]) -> dict[str, float]:
    """n / (labels x examples of the label): scikit-learn's class_weight="balanced"."""
    counts = Counter(e.target for e in examples)
    return {label: len(examples) / (len(counts) * n) for label, n in counts.items()}


def _forward(model: Any, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits at the last `keep` positions of a left-padded batch."""
    if "prefix_ids" in batch:
        if cpu.transformers_model(model).config._attn_implementation == cpu.SHARED_HEAD_KERNEL:
            return cpu.forward_with_flat_head(model, batch, keep)  # the head in the same pass
        head = prefix.encode(model, tuple(batch["prefix_ids"].tolist()))
        if head is None:
            raise ValueError("share_prefix: this model's cache is not plain keys and values")
        return prefix.logits_after(model, head, batch, keep)
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
    share_prefix: bool = False

    def encode(self, example: Example) -> Encoded | None:
        encoded = self.formatter.encode(example)
        if encoded is not None:
            encoded.weight = self.weights.get(example.target, 1.0)
        return encoded

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(batch, pad_id, self.share_prefix)

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
    share_prefix: bool = False

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
        rows = [e.input_ids for e in batch]
        # every row keeps at least its last token, where the logits are read
        length = shared_head(rows, min(len(r) for r in rows) - 1) if self.share_prefix else 0
        padded = left_pad([r[length:] for r in rows], pad_id)
        return with_head({**padded, "classes": classes, "weights": weights}, rows[0][:length])

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
