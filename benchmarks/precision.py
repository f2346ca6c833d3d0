"""Forward-pass time of a SmolLM2-135M-shaped model (random weights) in each numerics
sectune.placement can pick, on this CPU as it is and restricted to AVX2 (oneDNN and ATen told
to use no AVX-512, so no native bf16): what `auto` chooses and why.

    python benchmarks/precision.py [--batch 8 --tokens 51 --repeats 5]

Each ISA runs in its own process (the restriction is read when torch loads)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
RESTRICTED = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def measure(batch: int, tokens: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, tokens))
    results = {}
    for name, dtype, autocast in [
        ("float32", torch.float32, False),
        ("float32 + bf16 autocast", torch.float32, True),
        ("bf16 weights", torch.bfloat16, False),
    ]:
        model.to(dtype)
        times = []
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            model(input_ids=ids)  # warm-up
            for _ in range(repeats):
                began = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - began)
        results[name] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=51)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.batch, args.tokens, args.repeats)))
        return

    from sectune.placement import cpu_flags, cpu_has_native_bf16, for_serving, for_training

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx2")))
    print(f"CPU flags: {', '.join(flags)}; {os.cpu_count()} cores")
    print(f"forward pass of {args.batch} x {args.tokens} tokens, median of {args.repeats}")
    command = [sys.executable, __file__, "--child", "--batch", str(args.batch)]
    command += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    for label, extra, native in [
        ("this CPU", {}, cpu_has_native_bf16()),
        ("restricted to AVX2", RESTRICTED, False),
    ]:
        out = subprocess.run(
            command, env={**os.environ, **extra}, capture_output=True, text=True, check=True
        )
        times = json.loads(out.stdout.strip().splitlines()[-1])
        training = for_training("auto", "lora", "cpu", native_bf16=native).describe()
        serving = for_serving("auto", "cpu", native_bf16=native).describe()
        row = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in times.items())
        print(f"{label}: {row}")
        print(f"  auto picks: training/evaluate '{training}'; serve '{serving}'")


if __name__ == "__main__":
    main()
