"""Training speed side by side: sectune's training loop against the script a practitioner
would write (transformers Trainer + PEFT LoRA + DataCollatorForSeq2Seq, loss on the answer
only), on the same base model, examples, LoRA settings, batch and optimizer steps, run
alternately, each in a process of its own. sectune runs as a job without the precision field
does (`auto`: bf16 autocast on a CPU with native bf16, float32 otherwise); the script runs
with the Trainer's default (float32) and with `bf16=True`, so the table says how much of any
difference is numerics.

    python benchmarks/training.py --model ~/.cache/sectune/models/SmolLM2-135M-Instruct \\
        --data examples/attack-tactics/data/train.jsonl \\
        --heldout examples/attack-tactics/data/validation.jsonl --rounds 2

    # generation (every target token trained): log lines into JSON
    python benchmarks/training.py --model ~/.cache/sectune/models/SmolLM2-135M-Instruct \\
        --task generation --target-field fields --data examples/log-parsing/data/train.jsonl \\
        --heldout examples/log-parsing/data/validation.jsonl --examples 320 --heldout-rows 100

Per run: examples/s and target tokens/s (the label's tokens, counted the same way for every
run), wall time of the training loop, peak RSS, the mean training loss of the last 5 steps,
and on held-out rows (scored by the same function for every run): the answer-token loss,
accuracy and macro-F1. FLOP utilisation = target-path FLOPs / measured matmul peak, with
FLOPs per processed token = 4 x non-embedding parameters (forward 2N, gradient of the inputs
2N; frozen weights get no weight gradient, LoRA's own are negligible) + 2 x 2 x the LM head's
parameters per position where logits are computed. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "classification": "Name the MITRE ATT&CK tactic.",
    "generation": "Parse the log line into JSON.",
}
LORA = {"r": 16, "alpha": 32}


def rows(path: Path, count: int, seed: int, target: str = "label") -> list[dict[str, str]]:
    """`count` rows of `path` as {text, label}, `label` read from the field `target`."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    return [{"text": r["text"], "label": r[target]} for r in lines[:count]]


def spec_for(args: argparse.Namespace, labels: list[str], head: str) -> Any:
    from sectune.config import JobSpec

    task = (
        {"type": "generation", "systemPrompt": SYSTEMS["generation"]}
        if args.task == "generation"
        else {"labels": labels, "systemPrompt": SYSTEMS["classification"], "head": head}
    )
    return JobSpec.model_validate(
        {
            "baseModel": {"uri": f"file://{args.model}"},
            "dataset": {"train": f"file://{args.data}"},
            "task": task,
            "method": {"type": "lora", **LORA},
            "hyperparameters": {
                "learningRate": args.lr, "epochs": 100, "maxSteps": args.steps,
                "batchSize": args.batch, "gradientAccumulation": 1, "maxSeqLength": 256,
                "precision": args.precision, "warmupRatio": 0.03, "seed": args.seed,
            },
            "resources": {"gpus": 0},
        }
    )  # fmt: skip


def examples_of(data: list[dict[str, str]]) -> list[Any]:
    from sectune.data.example import Example

    return [Example(f"r{i}", {"text": r["text"]}, r["label"]) for i, r in enumerate(data)]


def train_sectune(args: argparse.Namespace, train: list[Any], labels: list[str]) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune import placement, storage
    from sectune.training.distributed import make_accelerator
    from sectune.training.train import Checkpoints, wrap_with_lora
    from sectune.training.train import train as run_training

    spec = spec_for(args, labels, args.head)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32")
    accelerator = make_accelerator(spec, placement.for_training(args.precision, "lora"))
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    checkpoints = Checkpoints(storage.parse_uri(f"file://{work}/job"), work, "bench", accelerator)
    began = time.perf_counter()
    result = run_training(
        wrap_with_lora(model, spec), tokenizer, train, spec, accelerator, checkpoints
    )
    seconds = time.perf_counter() - began
    losses = [h["loss"] for h in result.history[-5:]]
    return result.model, tokenizer, seconds, sum(losses) / len(losses)


def train_reference(args: argparse.Namespace, data: list[dict[str, str]]) -> Any:
    """What a practitioner writes with transformers and PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05,
                   target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip

    system = SYSTEMS[args.task]
    expert = args.side.startswith("reference-expert")
    grouped = args.side == "reference-expert"  # "reference-expert-shuffled": the same, shuffled
    bf16 = args.side == "reference-bf16" or (expert and args.expert_bf16)

    def encode(row: dict[str, str]) -> dict[str, list[int]]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": row["text"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": row["label"]}], tokenize=False
        )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        f = tokenizer(full, add_special_tokens=False)["input_ids"][:256]
        return {
            "input_ids": f,
            "attention_mask": [1] * len(f),
            "labels": [-100] * len(p) + f[len(p) :],
        }

    losses: list[float] = []

    class KeepLoss(TrainerCallback):
        def on_log(
            self, _args: Any, _state: Any, _control: Any, logs: Any = None, **_: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="bench-ref-"), per_device_train_batch_size=args.batch,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear",
            warmup_steps=int(0.03 * args.steps), logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            seed=args.seed, dataloader_num_workers=0, bf16=bf16,
            # The expert's script: the Trainer's own length grouping (`group_by_length=True`
            # before transformers 5) and fused AdamW.
            train_sampling_strategy="group_by_length" if grouped else "random",
            optim="adamw_torch_fused" if expert else "adamw_torch",
        ),
        train_dataset=[encode(r) for r in data],
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[KeepLoss()],
    )  # fmt: skip
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    model.eval()
    return model, tokenizer, seconds, sum(losses[-5:]) / len(losses[-5:])


def matmul_peak_gflops() -> float:
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    began, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - began) / 1e9


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sectune.data.format import PromptFormatter
    from sectune.evaluation.metrics import classification_metrics
    from sectune.evaluation.scoring import score_labels, validation_loss

    torch.manual_seed(args.seed)
    every = rows(args.data, 100_000, seed=1, target=args.target_field)
    data = every[: args.examples]  # the same shuffle: the first rows of it
    held = rows(args.heldout, args.heldout_rows, seed=2, target=args.target_field)
    labels = sorted({r["label"] for r in every}) if args.task == "classification" else []
    train, heldout = examples_of(data), examples_of(held)
    if args.side.startswith("reference"):
        model, tokenizer, seconds, final_loss = train_reference(args, data)
    else:
        model, tokenizer, seconds, final_loss = train_sectune(args, train, labels)
    rss_trained = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lm_spec = spec_for(args, labels, "lm")
    formatter = PromptFormatter(tokenizer, lm_spec)
    target_tokens = sum(len(formatter.target_ids(e)) for e in train)
    prompt_tokens = sum(len(formatter.prompt_ids(e)) for e in train)
    processed = args.steps * args.batch  # examples seen (wrapping over the list)
    scale = processed / len(train)
    metrics: dict[str, Any] = {"accuracy": None, "macroF1": None}  # none for generation
    if args.task == "classification":
        scores = score_labels(model, tokenizer, heldout, lm_spec, autocast=False)
        metrics = classification_metrics(
            [e.target for e in heldout], scores.predictions(labels), labels, scores.probabilities
        )
    config = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - (
        config.vocab_size * config.hidden_size  # embeddings (tied with the LM head here)
    )
    head = config.vocab_size * config.hidden_size
    tokens = (prompt_tokens + target_tokens) * scale
    ours = args.side == "sectune"
    logit_positions = (
        processed
        if ours and args.head == "classifier" and args.task == "classification"
        else (target_tokens * scale if ours else tokens)
    )
    flops = 4 * body * tokens + 4 * head * logit_positions
    return {
        "side": f"sectune ({args.head}, {args.precision})" if ours else args.side,
        "trainSeconds": round(seconds, 1),
        "examplesPerSecond": round(processed / seconds, 2),
        "targetTokensPerSecond": round(target_tokens * scale / seconds, 1),
        "allTokensPerSecond": round(tokens / seconds, 1),
        "seed": args.seed,
        "peakRssMiB": round(rss_trained),  # loading and training, before the held-out scoring
        "finalTrainLoss": round(final_loss, 4),
        "heldoutAnswerLoss": round(validation_loss(model, tokenizer, heldout, lm_spec), 4),
        "heldoutAccuracy": _rounded(metrics["accuracy"]),
        "heldoutMacroF1": _rounded(metrics["macroF1"]),
        "achievedGflops": round(flops / seconds / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument(
        "--data", type=Path, default=ROOT / "examples/attack-tactics/data/train.jsonl"
    )
    parser.add_argument(
        "--heldout", type=Path, default=ROOT / "examples/attack-tactics/data/validation.jsonl"
    )
    parser.add_argument("--examples", type=int, default=320)
    parser.add_argument("--heldout-rows", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--seed", type=int, default=42,
        help="LoRA initialisation, dropout and batch order; round k runs with seed + k",
    )  # fmt: skip
    parser.add_argument(
        "--task", choices=["classification", "generation"], default="classification",
        help="generation: every target token is trained and counted (e.g. log-parsing JSON)",
    )  # fmt: skip
    parser.add_argument("--target-field", default="label", help="the rows' target field")
    parser.add_argument(
        "--heads", default="lm,classifier", help="sectune heads to run; empty for none"
    )
    parser.add_argument(
        "--precision", default="auto",
        help="sectune's hyperparameters.precision (auto: what a job gets without the field)",
    )  # fmt: skip
    parser.add_argument(
        "--references", default="fp32,expert",
        help="Trainer + PEFT runs: fp32 (its defaults), bf16 (bf16=True), expert (bf16 where "
        "the CPU has it natively, length-grouped batches, fused AdamW), expert-shuffled (the same "
        "with shuffled batches); empty for none",
    )  # fmt: skip
    parser.add_argument(
        "--isa", choices=["native", "avx2"], default="native",
        help="avx2: every run restricted to AVX2 (oneDNN and ATen), a CPU without native bf16",
    )  # fmt: skip
    parser.add_argument(
        "--side",
        choices=["reference", "reference-bf16", "reference-expert", "reference-expert-shuffled",
                 "sectune"],
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument("--expert-bf16", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--head", default="lm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_run(args)))
        return
    from precision import RESTRICTED  # benchmarks/precision.py: AVX2 only, no native bf16

    from sectune.placement import cpu_has_native_bf16

    if args.isa == "avx2" and args.precision == "auto":
        args.precision = "fp32"  # what `auto` picks on a CPU without native bf16

    peak = matmul_peak_gflops()
    print(json.dumps({"matmulPeakGflops": round(peak, 1)}), flush=True)
    common = [sys.executable, __file__, "--model", str(args.model), "--data", str(args.data),
              "--heldout", str(args.heldout), "--examples", str(args.examples),
              "--heldout-rows", str(args.heldout_rows), "--steps", str(args.steps),
              "--batch", str(args.batch), "--lr", str(args.lr), "--task", args.task,
              "--target-field", args.target_field, "--precision", args.precision]  # fmt: skip
    sides = {
        "fp32": "reference",
        "bf16": "reference-bf16",
        "expert": "reference-expert",
        "expert-shuffled": "reference-expert-shuffled",
    }
    env = {**os.environ, **(RESTRICTED if args.isa == "avx2" else {})}
    if args.isa == "avx2":
        print(json.dumps({"isa": "AVX2 only (no native bf16): " + json.dumps(RESTRICTED)}))
    # The expert turns bf16 on where the CPU has it natively, as sectune's `auto` does.
    common += ["--expert-bf16", "1" if args.isa != "avx2" and cpu_has_native_bf16() else "0"]
    runs = [["--side", sides[r]] for r in args.references.split(",") if r]
    heads = [h for h in args.heads.split(",") if h]  # "": the references alone
    if args.task == "generation":
        heads = ["lm"] if heads else []
    runs += [["--side", "sectune", "--head", h] for h in heads]
    for round_ in range(args.rounds):
        for run in runs:
            seed = ["--seed", str(args.seed + round_)]
            out = subprocess.run(
                [*common, *seed, *run], capture_output=True, text=True, check=False, env=env
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["flopUtilisation"] = round(result["achievedGflops"] / peak, 3)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
