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

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sectune.config import JobSpec
from sectune.data.format import (
    IGNORE,
    Encoded,
    PromptFormatter,
    first_tokens_distinct,
    fit_prompt,
    label_token_ids,
)
from sectune.data.prepare import Example


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
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _forward(model: Any, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits at the last `keep` positions of a left-padded batch."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions,
        logits_to_keep=keep,
    )
    return out.logits


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Cross-entropy on target tokens, computing logits only for the positions that predict
    them (the LM head is a large share of a small model's FLOPs)."""
    labels = batch["labels"]
    target_span = int((labels != IGNORE).int().argmax(dim=1).min().item())
    # Positions from one before the first target to the end; the very first token of a
    # sequence is never a target (nothing predicts it).
    keep = min(labels.shape[1] - target_span + 1, labels.shape[1])
    logits = _forward(model, batch, keep)[:, :-1, :].float()
    targets = labels[:, -(keep - 1) :]
    tokens = int((targets != IGNORE).sum().item())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
    return loss, tokens


@dataclass
class NextToken:
    """task.head: lm (and every generative task)."""

    formatter: PromptFormatter

    def encode(self, example: Example) -> Encoded | None:
        return self.formatter.encode(example)

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

    @classmethod
    def build(cls, formatter: PromptFormatter, labels: list[str], example: Example) -> LabelHead:
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
        return cls(formatter, labels, [tokens[0] for tokens in ids])

    def encode(self, example: Example) -> Encoded | None:
        prompt = self.formatter.prompt_ids(example)
        truncated = len(prompt) > self.formatter.max_length
        if truncated:
            if self.formatter.spec.dataset.on_too_long == "drop":
                return None
            prompt = fit_prompt(prompt, self.formatter.max_length)
        return Encoded(prompt, [self.labels.index(example.target)], truncated)

    def collate(self, batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
        length = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, encoded in enumerate(batch):
            n = len(encoded.input_ids)
            ids[row, length - n :] = torch.tensor(encoded.input_ids)
            mask[row, length - n :] = 1
        classes = torch.tensor([e.labels[0] for e in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "classes": classes}

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = _forward(model, batch, 1)[:, -1, self.label_tokens].float()
        classes = batch["classes"]
        return torch.nn.functional.cross_entropy(logits, classes), int(classes.numel())


def objective_for(tokenizer: Any, spec: JobSpec, examples: list[Example]) -> Objective:
    """The objective `spec` asks for (`examples`: any of the job's, to render label tokens)."""
    formatter = PromptFormatter(tokenizer, spec)
    if spec.task.head == "classifier" and examples:
        return LabelHead.build(formatter, spec.task.labels, examples[0])
    return NextToken(formatter)
