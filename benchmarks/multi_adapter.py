"""Many adapters on one base model: throughput of the serving engine with 8 adapters in mixed
traffic against 1 adapter, and against naive per-request adapter switching.

Three runs of the same N classification requests (prompts from a data file) on one model:

- one adapter: every request for adapter 0, batched by the engine,
- eight adapters: requests spread round-robin over 8 adapters, batched together (PEFT routes
  each row of a mixed batch to its adapter),
- naive switching: one request at a time, `set_adapter` before each (what a server without
  multi-adapter batching does).

Adapters are LoRA r=16 on every attention and MLP projection, randomly initialised (the cost of
an adapter does not depend on what it learned).

    python benchmarks/multi_adapter.py --requests 256 \\
        --data examples/attack-tactics/data/validation.jsonl

Results go in BENCHMARKS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def adapters(model: Any, count: int, workdir: Path) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    paths = []
    for index in range(count):
        torch.manual_seed(index)
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        path = workdir / f"adapter-{index}"
        peft_model.save_pretrained(path, safe_serialization=True)
        model = peft_model.unload()  # the bare base model again, for the next adapter
        paths.append(path)
    return paths


def run_engine(
    engine: Any, prompts: list[list[int]], keys: list[str], label_ids: list[list[int]]
) -> float:
    from sectune.serving.engine import ClassifyWork

    began = time.perf_counter()
    futures = [
        engine.submit(ClassifyWork(key, prompt, label_ids=label_ids, distinct_first_tokens=True))
        for key, prompt in zip(keys, prompts, strict=True)
    ]
    for future in futures:
        future.result(timeout=600)
    return len(prompts) / (time.perf_counter() - began)


def run_naive(engine: Any, prompts: list[list[int]], keys: list[str]) -> float:
    """One request at a time with set_adapter before each, on the engine's own model."""
    from sectune.evaluation.scoring import forward_logprobs
    from sectune.training.objectives import left_pad

    model = engine.model
    began = time.perf_counter()
    with torch.inference_mode():
        for key, prompt in zip(keys, prompts, strict=True):
            model.set_adapter(key)
            batch = left_pad([prompt], engine.tokenizer.pad_token_id)
            forward_logprobs(model, batch, 1, None)
    return len(prompts) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="base model directory (default: the demo model)")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with a text column")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sectune.serving.engine import Engine
    from sectune.serving.metrics import ServingMetrics
    from sectune.training.base_model import fetch_demo_model

    torch.set_num_threads(torch.get_num_threads())
    model_dir = Path(args.model) if args.model else fetch_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    workdir = Path(tempfile.mkdtemp(prefix="sectune-multi-adapter-"))
    paths = adapters(model, args.adapters, workdir)

    engine = Engine(model, tokenizer, ServingMetrics(), autocast=False, max_batch=args.max_batch)
    engine.start()
    keys = [f"a{i}" for i in range(args.adapters)]
    for key, path in zip(keys, paths, strict=True):
        engine.load_adapter(str(path), key)

    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    texts = [row["text"] for row in rows][: args.requests]
    texts = (texts * (args.requests // len(texts) + 1))[: args.requests]
    prompts = [
        list(
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"Classify: {text}"}],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for text in texts
    ]
    label_ids = [[tokenizer.encode(word, add_special_tokens=False)[0]] for word in ("yes", "no")]

    run_engine(engine, prompts[:16], [keys[0]] * 16, label_ids)  # warm-up
    one = run_engine(engine, prompts, [keys[0]] * len(prompts), label_ids)
    mixed_keys = [keys[i % len(keys)] for i in range(len(prompts))]
    many = run_engine(engine, prompts, mixed_keys, label_ids)
    engine.stop()
    naive = run_naive(engine, prompts, mixed_keys)
    tokens = sum(len(p) for p in prompts) / len(prompts)
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "model": str(model_dir),
                "requests": len(prompts),
                "meanPromptTokens": round(tokens, 1),
                "maxBatch": args.max_batch,
                "oneAdapterRequestsPerSecond": round(one, 2),
                "mixedAdaptersRequestsPerSecond": round(many, 2),
                "ratioMixedToOne": round(many / one, 3),
                "naiveSwitchingRequestsPerSecond": round(naive, 2),
                "ratioMixedToNaive": round(many / naive, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
