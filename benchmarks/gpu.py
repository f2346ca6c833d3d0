"""GPU training throughput and memory: sectune's training loop against the script an expert
writes for the GPU (transformers Trainer + PEFT, `bf16=True`, fused AdamW), on a random-init
Llama of Llama-3-8B's shape, LoRA and QLoRA (4-bit NF4, double quantization), sequences packed
to 2048 tokens. Each run is a process of its own, so its peak GPU memory is its own.

    python benchmarks/gpu.py --tokenizer ~/.cache/sectune/models/SmolLM2-135M-Instruct \\
        --work /tmp/gpu-bench --out gpu.json --seeds 1 2

Both sides train on the same packed rows (sectune's own encoding and packing of the log-parsing
examples: every example keeps its positions and attends only to itself), with the same LoRA
settings (r 16, alpha 32, dropout 0.05, every linear layer), batch, learning rate and steps.
Tokens/s counts the tokens of every row (padding not counted) over the steps after the first
`--warmup` (CUDA start-up, cuBLAS and the allocator's growth), the same estimator on both sides.
Peak memory is torch's peak allocated (and reserved) on the GPU over loading and training.
`sectune evaluate`'s scoring (sectune.evaluation.scoring.score_labels, held-out ATT&CK rows)
is timed on the LoRA model after training: rows/s.

`--shape tiny` runs the same on a 2-layer model (on the CPU too) to check the script.
Results go in BENCHMARKS.md ("GPU rows").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Parse the log line into JSON."
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3-8B's shape (8.03 B parameters); the weights are random.
    "8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
        "max_position_embeddings": 4096,
    },
}  # fmt: skip
SIDES = ("sectune-lora", "reference-lora", "sectune-qlora", "reference-qlora")


def build_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A random-init Llama of `shape` in bf16 safetensors, with the tokenizer of
    `tokenizer_dir` (its ids are all below the shape's vocabulary)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def job_spec(model: Path, quantized: bool, args: argparse.Namespace) -> Any:
    from sectune.config import JobSpec

    return JobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{model}", "quantization": "nf4" if quantized else "none"},
            "dataset": {"train": f"file://{ROOT}/examples/log-parsing/data/train.jsonl"},
            "task": {"type": "generation", "systemPrompt": SYSTEM},
            "method": {"type": "qlora" if quantized else "lora", **LORA},
            "hyperparameters": {
                "learningRate": 2e-4, "epochs": 1000, "maxSteps": args.steps,
                "batchSize": args.batch, "gradientAccumulation": 1, "maxSeqLength": args.seq,
                "packing": True, "precision": "auto", "warmupRatio": 0.0, "seed": args.seed,
            },
            "resources": {"gpus": 1},
        }
    )  # fmt: skip


def examples() -> list[Any]:
    from sectune.data.example import Example

    path = ROOT / "examples/log-parsing/data/train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Example(f"r{i}", {"text": r["text"]}, r["fields"]) for i, r in enumerate(rows)]


def packed_rows(tokenizer: Any, spec: Any) -> list[Any]:
    """sectune's own encoding and packing of the examples (what its loop trains on)."""
    from sectune.training.objectives import objective_for
    from sectune.training.train import pack

    rows = examples()
    objective = objective_for(tokenizer, spec, rows, weighted=True)
    encoded = [e for e in map(objective.encode, rows) if e is not None]
    return pack(encoded, spec.hyperparameters.max_seq_length)


class StepClock:
    """Wall time at the end of each optimizer step (after the GPU finished it)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def tick(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def steady(self, total_tokens: int, warmup: int) -> tuple[float, float]:
        """(seconds, tokens) over the steps after `warmup`, tokens prorated per step."""
        steps = len(self.ends)
        seconds = self.ends[-1] - self.ends[warmup - 1]
        return seconds, total_tokens * (steps - warmup) / steps


def run_sectune(args: argparse.Namespace, quantized: bool) -> dict[str, Any]:
    from sectune import storage
    from sectune.runner import _load_base_model
    from sectune.training import base_model
    from sectune.training.train import Checkpoints, train, wrap_with_lora

    # A job hashes the base weights for its lineage (16 GB here: half a minute per run); the
    # benchmark times training, so it skips that.
    base_model.weights_digest = lambda directory: "sha256:not-computed-by-the-benchmark"
    spec = job_spec(args.model, quantized, args)
    loaded = _load_base_model(spec)
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    checkpoints = Checkpoints(
        storage.parse_uri(f"file://{work}/job"), work, "bench", loaded.accelerator
    )
    clock = StepClock()
    result = train(
        wrap_with_lora(loaded.model, spec),
        loaded.tokenizer,
        examples(),
        spec,
        loaded.accelerator,
        checkpoints,
        on_step=lambda progress: clock.tick(),
    )
    seconds, tokens = clock.steady(result.tokens, args.warmup)
    out = {
        "numerics": loaded.numerics.describe(),
        "tokensPerSecond": round(tokens / seconds, 1),
        "finalLoss": round(result.history[-1]["loss"], 4),
    }
    if not quantized and args.seed == args.seeds[0]:
        out["evaluateRowsPerSecond"] = evaluate_rate(result.model, loaded.tokenizer, args)
    return out


def evaluate_rate(model: Any, tokenizer: Any, args: argparse.Namespace) -> float:
    """Held-out scoring as `sectune evaluate` does it (one forward pass per row batch, each
    label's probability), rows/s on this model."""
    from sectune.config import JobSpec
    from sectune.data.example import Example
    from sectune.evaluation.scoring import score_labels

    path = ROOT / "examples/attack-tactics/data/validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[: args.eval_rows]]
    labels = sorted({r["label"] for r in rows})
    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{args.model}"},
            "dataset": {"train": f"file://{path}"},
            "task": {"labels": labels, "systemPrompt": "Name the MITRE ATT&CK tactic."},
            "method": {"type": "lora"},
        }
    )
    heldout = [Example(f"h{i}", {"text": r["text"]}, r["label"]) for i, r in enumerate(rows)]
    score_labels(model, tokenizer, heldout[:16], spec, autocast=True)  # warm-up
    clock = StepClock()
    clock.tick()
    score_labels(model, tokenizer, heldout, spec, autocast=True)
    clock.tick()
    return round(len(heldout) / (clock.ends[1] - clock.ends[0]), 1)


def run_reference(args: argparse.Namespace, quantized: bool) -> dict[str, Any]:
    """The expert's script: Trainer + PEFT on the GPU in bf16 with fused AdamW, the same packed
    rows (position ids restart per example, as transformers' own padding-free collator
    makes them)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": 0}}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if not torch.cuda.is_available():
        kwargs = {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(
        model,
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                   target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    rows = packed_rows(tokenizer, job_spec(args.model, quantized, args))
    random.Random(args.seed).shuffle(rows)
    dataset = [
        {"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.positions} for r in rows
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = {"seen": 0}

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        out = {
            "input_ids": torch.full((len(batch), length), pad),
            "labels": torch.full((len(batch), length), -100),
            "position_ids": torch.zeros((len(batch), length), dtype=torch.long),
        }
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            out["input_ids"][i, :n] = torch.tensor(b["input_ids"])
            out["labels"][i, :n] = torch.tensor(b["labels"])
            out["position_ids"][i, :n] = torch.tensor(b["position_ids"])
            tokens["seen"] += n
        return out

    clock = StepClock()
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.tick()

        def on_log(self, *_: Any, logs: Any = None, **__: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    gpu = torch.cuda.is_available()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="gpu-bench-ref-"), per_device_train_batch_size=args.batch,
            max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="linear", logging_steps=1,
            save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
            bf16=gpu, use_cpu=not gpu, optim="adamw_torch_fused" if gpu else "adamw_torch",
            remove_unused_columns=False,
        ),
        train_dataset=dataset,
        data_collator=collate,
        callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    seconds, counted = clock.steady(tokens["seen"], args.warmup)
    return {
        "numerics": "bf16 (Trainer bf16=True)" if gpu else "float32",
        "tokensPerSecond": round(counted / seconds, 1),
        "finalLoss": round(losses[-1], 4),
    }


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.manual_seed(args.seed)
    quantized = args.side.endswith("qlora")
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    run = run_reference if args.side.startswith("reference") else run_sectune
    result = run(args, quantized)
    result.update(side=args.side, seed=args.seed, wallSeconds=round(time.perf_counter() - began))
    if gpu:
        result["peakAllocatedGiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peakReservedGiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu-bench")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per run")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # one run, in its own process
        print(json.dumps(one_run(args)), flush=True)
        return
    began = time.perf_counter()
    model = build_model(args.shape, args.tokenizer, args.work / f"llama-{args.shape}")
    print(f"model ready in {time.perf_counter() - began:.0f} s", flush=True)
    for seed in args.seeds:
        for side in args.sides:
            command = [
                sys.executable, __file__, "--side", side, "--seed", str(seed),
                "--model", str(model), "--tokenizer", str(args.tokenizer), "--out", str(args.out),
                "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--batch", str(args.batch), "--seq", str(args.seq),
                "--eval-rows", str(args.eval_rows), "--seeds", *map(str, args.seeds),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            line = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
            result = (
                json.loads(line[0])
                if line
                else {"side": side, "seed": seed, "failed": done.stderr[-3000:]}
            )
            with args.out.open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
