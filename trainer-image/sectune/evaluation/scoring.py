"""Score a label set with the language model: one forward pass per batch of prompts.

Each label's probability is the model's probability of the label's first target token,
renormalised over the label set (no sampling). When two labels share a first token, every
label's full target sequence is scored instead (one pass per label), so the ranking is exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from sectune import placement, progress
from sectune.config import JobSpec
from sectune.data.example import Example
from sectune.data.format import PromptFormatter, first_tokens_distinct, label_token_ids
from sectune.evaluation.prefix import PrefixCache, logprobs_after
from sectune.training.distributed import world_size
from sectune.training.objectives import left_pad, objective_for


@dataclass
class LabelScores:
    probabilities: list[list[float]]
    """Per example, the probability of each label (in task.labels order)."""
    latencies_ms: list[float] = field(default_factory=list)
    """Per single request (batch of one), when measured."""
    throughput: float = 0.0
    """Examples scored per second at the batch size used."""

    def predictions(self, labels: list[str]) -> list[str]:
        return [labels[max(range(len(labels)), key=row.__getitem__)] for row in self.probabilities]


def forward_logprobs(
    model: Any,
    batch: dict[str, torch.Tensor],
    keep: int,
    adapter_names: list[str] | None = None,
) -> torch.Tensor:
    """Log-probabilities at the last `keep` positions of a left-padded batch. With
    `adapter_names` (a PEFT model), each row runs through its own adapter ("__base__": none)."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    out = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep,
        **extra,
    )
    return out.logits.float().log_softmax(-1).cpu()


def last_logprobs(
    model: Any,
    prompts: list[list[int]],
    pad_id: int,
    heads: PrefixCache | None = None,
    key: str = "model",
    adapter_names: list[str] | None = None,
) -> torch.Tensor:
    """Log-probabilities after each prompt, shape (prompts, vocab): after `key`'s cached head
    (sectune.evaluation.prefix) when `heads` has one every prompt shares, else of the whole
    prompts. A mixed-adapter batch (`adapter_names`) has no one head and runs whole."""
    head = heads.head(key, prompts, model) if heads is not None and not adapter_names else None
    if head is None:
        return forward_logprobs(model, left_pad(prompts, pad_id), 1, adapter_names)[:, -1]
    rest = [p[len(head.tokens) :] for p in prompts]
    return logprobs_after(model, head, left_pad(rest, pad_id))


def sequence_logprobs(
    model: Any,
    prompts: list[list[int]],
    label_ids: list[list[int]],
    pad_id: int,
    adapter_names: list[str] | None = None,
) -> torch.Tensor:
    """Log-probability of each label's whole target sequence after each prompt (one pass per
    label): exact when labels share their first token. Shape (prompts, labels)."""
    columns = []
    for ids in label_ids:
        rows = [p + ids for p in prompts]
        logprobs = forward_logprobs(model, left_pad(rows, pad_id), len(ids) + 1, adapter_names)
        targets = torch.tensor(ids)
        picked = logprobs[:, :-1, :].gather(-1, targets.expand(len(rows), -1).unsqueeze(-1))
        columns.append(picked.squeeze(-1).sum(-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()  # not inference_mode: ZeRO-3 shards gathered inside must stay trainable
def score_labels(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    batch_size: int = 8,
    autocast: bool = True,
    measure_latency: int = 0,
    prefix_cache: bool = True,
) -> LabelScores:
    """Label probabilities for each example; optionally time `measure_latency` single requests.
    With `prefix_cache` (one process only: ranks of a sharded model must run the same passes),
    each batch starts after the cached keys and values of the head every prompt shares, as the
    server does (sectune.evaluation.prefix)."""
    labels = spec.task.labels
    formatter = PromptFormatter(tokenizer, spec)
    model.eval()
    prompts = [formatter.prompt_ids(e) for e in examples]
    label_ids = label_token_ids(formatter, examples[0], labels) if examples else []
    first_tokens = [ids[0] for ids in label_ids]
    distinct = first_tokens_distinct(label_ids)
    max_len = spec.hyperparameters.max_seq_length
    prompts = [p[-max_len:] for p in prompts]
    device_type = next(model.parameters()).device.type
    amp = placement.autocast(device_type, autocast)

    heads = PrefixCache() if prefix_cache and world_size() == 1 else None

    def score(batch_prompts: list[list[int]]) -> list[list[float]]:
        with amp:
            if distinct:
                logprobs = last_logprobs(model, batch_prompts, tokenizer.pad_token_id, heads)
                chosen = logprobs[:, first_tokens]
            else:
                chosen = sequence_logprobs(model, batch_prompts, label_ids, tokenizer.pad_token_id)
        return chosen.softmax(-1).tolist()

    # Rows of similar length share a batch (less padding); answers go back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    probabilities: list[list[float]] = [[] for _ in prompts]
    began = time.perf_counter()
    for start in progress.batches("scoring labels", len(prompts), batch_size):
        rows = order[start : start + batch_size]
        for i, answer in zip(rows, score([prompts[i] for i in rows]), strict=True):
            probabilities[i] = answer
    throughput = len(prompts) / max(time.perf_counter() - began, 1e-9)
    latencies = []
    for prompt in prompts[:measure_latency]:
        began = time.perf_counter()
        score([prompt])
        latencies.append((time.perf_counter() - began) * 1000)
    return LabelScores(probabilities, latencies, throughput)


@torch.no_grad()  # not inference_mode: ZeRO-3 shards gathered inside must stay trainable
def validation_loss(
    model: Any, tokenizer: Any, examples: list[Example], spec: JobSpec, batch_size: int = 8
) -> float:
    """Mean of the training objective on held-out examples (every task type): cross-entropy
    on the target tokens, or over the label set for task.head: classifier."""
    objective = objective_for(tokenizer, spec, examples)
    encoded = [e for e in (objective.encode(x) for x in examples) if e is not None]
    if not encoded:
        return float("nan")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in progress.batches("validation loss", len(encoded), batch_size):
        batch = objective.collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        loss, tokens = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss) * tokens
        count += tokens
    return total / max(count, 1)


def nearest(pool: list[str], queries: list[str] | None, k: int) -> list[list[int]]:
    """Indices into `pool` of each query's k nearest texts (TF-IDF word 1-2-grams, cosine);
    with no queries, of each pool text's k nearest others (it never retrieves itself)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import NearestNeighbors

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    matrix = vectorizer.fit_transform(pool)
    if queries is None:
        index = NearestNeighbors(n_neighbors=min(k + 1, len(pool)), metric="cosine").fit(matrix)
        _, rows = index.kneighbors(matrix)
        return [[int(j) for j in row if j != i][:k] for i, row in enumerate(rows)]
    index = NearestNeighbors(n_neighbors=min(k, len(pool)), metric="cosine").fit(matrix)
    _, rows = index.kneighbors(vectorizer.transform(queries))
    return [[int(j) for j in row] for row in rows]


def with_demonstrations(examples: list[Example], train: list[Example], k: int = 3) -> list[Example]:
    """Few-shot retrieval baseline: each example's input preceded by its k nearest training
    examples (TF-IDF cosine) with their labels."""
    pool = [e for e in train if not e.canary]
    neighbours = nearest([e.text for e in pool], [e.text for e in examples], k)
    out = []
    for example, rows in zip(examples, neighbours, strict=True):
        shots = "\n\n".join(f"Example: {pool[i].text}\nAnswer: {pool[i].target}" for i in rows)
        out.append(
            Example(
                example.id,
                {**example.fields, "text": f"{shots}\n\nNow: {example.text}"},
                example.target,
            )
        )
    return out


def consistency(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    autocast: bool,
    runs: tuple[int, ...] = (8, 3, 1),
) -> float:
    """Agreement of predictions when the same inputs are scored in different batch
    compositions (what a serving batcher does): the fraction on which every run agrees."""
    labels = spec.task.labels
    predictions = [
        score_labels(model, tokenizer, examples, spec, batch_size=b, autocast=autocast).predictions(
            labels
        )
        for b in runs
    ]
    agree = sum(len(set(column)) == 1 for column in zip(*predictions, strict=True))
    return agree / max(len(examples), 1)


@torch.no_grad()  # not inference_mode: ZeRO-3 shards gathered inside must stay trainable
def generate(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    schema: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy outputs (the serving decode settings) for each example's prompt; with `schema`,
    held to it while decoding (sectune.constrained), as the server holds an extraction
    adapter's answers."""
    from transformers import LogitsProcessorList

    from sectune.constrained import SchemaConstrained, compiled_grammar

    grammar = compiled_grammar(schema, tokenizer) if schema is not None else None
    formatter = PromptFormatter(tokenizer, spec)
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in progress.batches("generating", len(examples), batch_size):
        prompts = [
            formatter.prompt_ids(e)[-spec.hyperparameters.max_seq_length :]
            for e in examples[start : start + batch_size]
        ]
        batch = left_pad(prompts, tokenizer.pad_token_id)
        held = [SchemaConstrained(tokenizer, [grammar] * len(prompts))] if grammar else []
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList(held),
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return outputs
