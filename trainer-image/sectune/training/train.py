"""The training loop: one readable path from prepared examples to a trained adapter.

    load base model (+4-bit) -> wrap with LoRA -> encode examples -> AdamW + schedule
    -> steps (bf16 autocast, gradient accumulation, logits only where the loss needs them;
       the loss is task.head's objective, training/objectives.py)
    -> checkpoints (every N steps and on SIGTERM) -> trained model

accelerate runs the same code single-process, as multi-process DDP (gloo on CPU, NCCL on GPUs)
or under DeepSpeed ZeRO (training/distributed.py builds its configuration from the job). Only the
main process logs and uploads; at ZeRO-3 every rank takes part in gathering what it saves.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import DistributedType

from sectune import storage
from sectune.config import JobSpec
from sectune.contract import TrainingProgress
from sectune.data.example import Example
from sectune.data.format import Encoded
from sectune.evaluation import prefix
from sectune.training import cpu
from sectune.training.distributed import uses_deepspeed
from sectune.training.dropout import use_seeded_dropout
from sectune.training.objectives import batch_tokens, objective_for

log = logging.getLogger(__name__)

# Module names of the linear layers in each block, per architecture family.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run should be retried."""


@dataclass
class TrainResult:
    model: Any
    prepared: Any
    """The model as accelerate prepared it (a DeepSpeed engine under DeepSpeed)."""
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    tokens: int = 0
    seconds: float = 0.0
    truncated: int = 0
    dropped: int = 0


def wrap_with_lora(model: Any, spec: JobSpec) -> Any:
    """Freeze the base and add LoRA adapters (after k-bit preparation for QLoRA), their
    dropout drawn the cheap way (training/dropout.py)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    method = spec.method
    if spec.hyperparameters.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method.type in ("full", "continued-pretraining") and spec.base_model.quantization == "none":
        return model
    if spec.base_model.quantization != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.hyperparameters.gradient_checkpointing
        )
    targets: list[str] | str = method.target_modules or DEFAULT_TARGETS.get(
        model.config.model_type, "all-linear"
    )
    config = LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    use_seeded_dropout(model)
    return model


GROUP_STEPS = 16
"""Steps whose examples are sorted by length together (see length_grouped)."""


def length_grouped(order: list[int], lengths: list[int], per_step: int, seed: int) -> list[int]:
    """`order` (an epoch's shuffled example indices) with every window of GROUP_STEPS steps
    sorted by length and cut into steps, and the window's steps shuffled: each batch holds
    examples of similar length, so little of it is padding, while the epoch stays shuffled at
    the window's scale. A window's last, partial step stays last."""
    rng = random.Random(seed)
    window = per_step * GROUP_STEPS
    grouped: list[int] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lengths.__getitem__)
        steps = [part[i : i + per_step] for i in range(0, len(part), per_step)]
        full = [s for s in steps if len(s) == per_step]
        rng.shuffle(full)
        grouped += [i for step in full + [s for s in steps if len(s) < per_step] for i in step]
    return grouped


def groups_by_length(spec: JobSpec) -> bool:
    """Length-grouped batches for classification only: there they cost nothing in held-out
    quality and save padding. A generation task's lengths follow its formats (one log source
    per length), so grouped batches each hold one format; on log parsing they ended with 2-3x
    the held-out loss of shuffled batches, for 12-25 % less time (BENCHMARKS.md)."""
    return spec.task.type == "classification"


def epoch_order(lengths: list[int], per_step: int, seed: int, grouped: bool) -> list[int]:
    """One epoch's example order: shuffled with `seed`, then length-grouped if `grouped`."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return length_grouped(order, lengths, per_step, seed) if grouped else order


def pack(encoded: list[Encoded], max_length: int) -> list[Encoded]:
    """Concatenate short examples into sequences of up to `max_length` tokens (generation
    tasks): fewer, fuller sequences, no padding between examples. Each example keeps its own
    positions (from 0) and labels, and attends only to itself: transformers builds a
    block-diagonal causal mask from position ids that restart, so an example never sees the
    one packed before it, as at evaluation."""
    packed: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for item in encoded:
        if ids and len(ids) + len(item.input_ids) > max_length:
            packed.append(Encoded(ids, labels, positions=positions))
            ids, labels, positions = [], [], []
        ids += item.input_ids
        labels += item.labels
        positions += range(len(item.input_ids))
    if ids:
        packed.append(Encoded(ids, labels, positions=positions))
    return packed


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Resumable state under <job prefix>/checkpoints/: step-N/ plus latest.json (written last,
    so a half-written checkpoint is never picked up). Adapter weights are safetensors; optimizer
    state is loaded with torch.load(weights_only=True).

    Every process calls save() and load() (at ZeRO-3 the trainable weights are gathered from
    all ranks); only the main process writes. Under DeepSpeed the optimizer's state is sharded
    across ranks and is not kept: a resumed run continues from the saved weights, step and
    schedule with fresh AdamW moments."""

    def __init__(
        self,
        prefix: storage.Location,
        workdir: Any,
        fingerprint: str = "",
        accelerator: Any = None,
    ) -> None:
        self.prefix = prefix.join("checkpoints")
        self.workdir = workdir
        self.fingerprint = fingerprint
        """Digest of the job config and data: a checkpoint of other training is never resumed."""
        self.accelerator = accelerator

    @property
    def _main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def _keeps_optimizer(self) -> bool:
        return self.accelerator is None or self.accelerator.state.deepspeed_plugin is None

    def latest(self) -> dict[str, Any] | None:
        pointer = self.prefix.join("latest.json")
        if not storage.exists(pointer):
            return None
        latest = dict(json.loads(storage.read_bytes(pointer, 64 << 10)))
        step = latest.get("step")
        if not isinstance(step, int) or latest.get("path") != f"step-{step}":
            # The path becomes part of a URI and a local directory: only what save() writes.
            log.warning("%s is malformed; training from the start", pointer.uri)
            return None
        if latest.get("fingerprint", "") != self.fingerprint:
            log.warning(
                "%s holds a checkpoint of a different config or dataset; training from the start",
                self.prefix.uri,
            )
            return None
        return latest

    def save(
        self, model: Any, optimizer: Any, scheduler: Any, step: int, extra: dict[str, Any]
    ) -> None:
        from safetensors.torch import save_file

        from sectune.training.distributed import gathered

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with gathered(self.accelerator, [p for _, p in named]):
            trainable = {n: p.detach().cpu().clone().contiguous() for n, p in named}
        if not self._main:
            return
        local = self.workdir / f"checkpoint-{step}"
        local.mkdir(parents=True, exist_ok=True)
        save_file(trainable, str(local / "trainable.safetensors"))
        state = {"scheduler": scheduler.state_dict()}
        if self._keeps_optimizer:
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, local / "optimizer.pt")
        (local / "state.json").write_text(json.dumps({"step": step, **extra}))
        target = self.prefix.join(f"step-{step}")
        storage.upload_dir(local, target)
        storage.write_bytes(
            self.prefix.join("latest.json"),
            json.dumps(
                {"step": step, "path": f"step-{step}", "fingerprint": self.fingerprint}
            ).encode(),
        )

    def load(
        self, model: Any, optimizer: Any, scheduler: Any, latest: dict[str, Any]
    ) -> dict[str, Any]:
        from safetensors.torch import load_file

        from sectune.training.distributed import gathered

        local = storage.download_dir(
            self.prefix.join(latest["path"]), self.workdir / f"resume-{latest['step']}"
        )
        weights = load_file(str(local / "trainable.safetensors"))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, _ in named if n not in weights]
        if missing:
            raise RuntimeError(
                f"checkpoint {latest['path']} does not match the model ({missing[0]} missing)"
            )
        with torch.no_grad(), gathered(self.accelerator, [p for _, p in named], modifier_rank=0):
            for name, param in named:
                param.copy_(weights[name])
        state = torch.load(local / "optimizer.pt", weights_only=True)
        if "optimizer" in state and self._keeps_optimizer:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return dict(json.loads((local / "state.json").read_text()))


# --------------------------------------------------------------------------- the loop


def _anyone(accelerator: Any, flag: bool) -> bool:
    """True on every process when any process has `flag` set (a SIGTERM seen by one rank stops
    them all at the same step, so a checkpoint is saved collectively)."""
    if accelerator.num_processes == 1:
        return flag
    seen = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(seen, reduction="sum").item() > 0)


def shares_prefix(model: Any, spec: JobSpec, accelerator: Any) -> bool:
    """Whether a batch's common head is computed once per batch (training.objectives): in one
    process (DDP and DeepSpeed expect one forward pass per backward), without gradient
    checkpointing (its recomputation would extend the key/value cache twice), on a model whose
    cache is plain keys and values."""
    if accelerator.num_processes > 1 or spec.hyperparameters.gradient_checkpointing:
        return False
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return False
    with torch.no_grad():
        return prefix.encode(model, tuple(range(1, prefix.MIN_TOKENS + 1))) is not None


def train(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    spec: JobSpec,
    accelerator: Any,
    checkpoints: Checkpoints,
    on_step: Callable[[TrainingProgress], None] = lambda progress: None,
) -> TrainResult:
    """Train `model` (already wrapped with LoRA) on `examples`; resume from the latest
    checkpoint if there is one."""
    from transformers import get_scheduler

    hp = spec.hyperparameters
    objective = objective_for(tokenizer, spec, examples, weighted=True)
    encoded, truncated, dropped = [], 0, 0
    for example in examples:
        item = objective.encode(example)
        if item is None:
            dropped += 1
            continue
        truncated += item.truncated
        encoded.append(item)
    if not encoded:
        raise ValueError("no training example fits hyperparameters.maxSeqLength; raise it")
    if hp.packing and spec.task.type != "classification":
        encoded = pack(encoded, hp.max_seq_length)

    grouped = groups_by_length(spec)
    world = accelerator.num_processes
    per_step = hp.batch_size * hp.gradient_accumulation * world
    lengths = [len(e.input_ids) for e in encoded]
    steps_per_epoch = max(1, math.ceil(len(encoded) / per_step))
    total_steps = steps_per_epoch * hp.epochs
    if hp.max_steps:
        total_steps = min(total_steps, hp.max_steps)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=hp.resolved_learning_rate(spec.method.type),
        weight_decay=hp.weight_decay,
        # one kernel over every tensor (4x faster over LoRA's ~400 small ones on a CPU); under
        # DeepSpeed its own partitions take torch's default path
        fused=None if uses_deepspeed(spec) else True,
    )
    scheduler = get_scheduler(
        hp.scheduler,
        optimizer,
        num_warmup_steps=int(total_steps * hp.warmup_ratio),
        num_training_steps=total_steps,
    )
    step, resumed_from = 0, None
    latest = checkpoints.latest()
    if latest is not None:
        # Before prepare: DeepSpeed takes its float32 master weights from the module as it is.
        state = checkpoints.load(model, optimizer, scheduler, latest)
        step = resumed_from = int(state["step"])
    objective.share_prefix = shares_prefix(model, spec, accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    stop = {"requested": False}
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    history: list[dict[str, float]] = []
    started, tokens_seen = time.monotonic(), 0
    pad_id = tokenizer.pad_token_id
    model.train()
    order_epoch, order = -1, []
    # On a CPU: each batch's attention kernel by its length (a shared head in the rows' pass),
    # and the frozen base's weights in bf16 under bf16 autocast (training/cpu.py; none of it
    # changes what is computed).
    inner = accelerator.unwrap_model(model)
    half_frozen = (
        accelerator.device.type == "cpu"
        and accelerator.mixed_precision == "bf16"
        and accelerator.distributed_type != DistributedType.DEEPSPEED
    )
    try:
        with (
            cpu.attention_by_length(inner, accelerator.device.type) as attention,
            cpu.frozen_weights_in_bf16(inner, half_frozen),
        ):
            while step < total_steps:
                epoch, offset = divmod(step, steps_per_epoch)
                if epoch != order_epoch:  # one order per epoch, the same on every rank and resume
                    order = epoch_order(lengths, per_step, hp.seed + epoch, grouped=grouped)
                    order_epoch = epoch
                # Every step has exactly per_step examples (wrapping at the end of an epoch), so each
                # process gets the same number of micro-batches and the all-reduces line up; the
                # last micro-batch of a step is where accelerate (or DeepSpeed) syncs and steps.
                start = offset * per_step
                chunk = [order[(start + j) % len(order)] for j in range(per_step)]
                mine = chunk[accelerator.process_index :: world]
                micro = [mine[i : i + hp.batch_size] for i in range(0, len(mine), hp.batch_size)]
                loss_sum, step_tokens = 0.0, 0
                for ids in micro:
                    batch = {
                        k: v.to(accelerator.device)
                        for k, v in objective.collate([encoded[i] for i in ids], pad_id).items()
                    }
                    head = len(batch.get("prefix_ids", ()))
                    attention(batch["input_ids"].shape[1] + head, head > 0)
                    with accelerator.accumulate(model), accelerator.autocast():
                        loss, _n_targets = objective.loss(model, batch)
                        accelerator.backward(loss)  # divided by the accumulation steps there
                    loss_sum += float(loss.detach()) / len(micro)
                    step_tokens += batch_tokens(batch)
                # DeepSpeed clips, steps and zeroes inside backward(); these are no-ops there.
                accelerator.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens * world
                elapsed = time.monotonic() - started
                done = step - (resumed_from or 0)
                report = TrainingProgress(
                    step=step,
                    total_steps=total_steps,
                    loss=loss_sum,
                    learning_rate=float(scheduler.get_last_lr()[0]),
                    tokens_per_second=tokens_seen / max(elapsed, 1e-9),
                    eta_seconds=elapsed / done * (total_steps - step),
                    epoch=step / steps_per_epoch,
                )
                history.append(
                    {
                        "step": step,
                        "loss": report.loss,
                        "learningRate": report.learning_rate,
                        "tokensPerSecond": report.tokens_per_second,
                    }
                )
                if accelerator.is_local_main_process:  # each pod's metrics; the CLI prints rank 0's
                    on_step(report)
                last = step == total_steps
                stopping = _anyone(accelerator, stop["requested"])
                if not last and (step % hp.checkpoint_every_steps == 0 or stopping):
                    checkpoints.save(
                        accelerator.unwrap_model(model),
                        optimizer,
                        scheduler,
                        step,
                        {"epoch": epoch},
                    )
                if stopping and not last:
                    raise Preempted(f"stopped at step {step}/{total_steps}; checkpoint saved")
    finally:
        signal.signal(signal.SIGTERM, previous)
    model.eval()
    return TrainResult(
        model=accelerator.unwrap_model(model),
        prepared=model,
        steps=total_steps,
        history=history,
        resumed_from=resumed_from,
        tokens=tokens_seen,
        seconds=time.monotonic() - started,
        truncated=truncated,
        dropped=dropped,
    )
