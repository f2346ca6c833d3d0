"""`/v1/classify` with and without the prefix cache, side by side in one run.

Starts `sectune serve` on one classification adapter twice per round (`--no-prefix-cache`, then
the default), and measures p50/p95 latency and requests/s with 1, 8 and 32 clients in flight.
Rounds alternate off/on so drift in the machine's speed falls on both. It also reports the
tokens each request computes (prompt, shared head) and classify throughput as a fraction of
the machine's measured matmul peak: forward FLOPs = 2 x non-embedding parameters x tokens
computed (the attention over the prompt is small next to it at these lengths).

    python benchmarks/prefix_cache.py --adapter attack-tactics=file://runs/attack-tactics \\
        --data examples/attack-tactics/data/validation.jsonl --rounds 2

Results go in BENCHMARKS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_latency import percentile, texts, timed  # noqa: E402

from support.serving import start_server  # noqa: E402

CONCURRENCY = (1, 8, 32)


def prompt_tokens(adapter_uri: str, inputs: list[str]) -> tuple[list[int], int, int]:
    """Each input's prompt length as the server builds it, the head they all share, and the
    base model's non-embedding parameter count."""
    from sectune import artifacts
    from sectune.config import JobSpec
    from sectune.data.example import Example
    from sectune.data.format import PromptFormatter
    from sectune.evaluation.prefix import common_length
    from sectune.training import base_model

    uri, sha256 = artifacts.resolve_version(adapter_uri, None)
    manifest = artifacts.verify(uri, sha256)
    spec = JobSpec.model_validate(manifest.config)
    model, tokenizer = base_model.load(
        base_model.resolve(spec.base_model), spec.base_model, None, "cpu"
    )
    formatter = PromptFormatter(tokenizer, spec)
    prompts = [formatter.prompt_ids(Example("r", {"text": t}, "")) for t in inputs]
    embedding = model.get_input_embeddings().weight.numel()
    parameters = sum(p.numel() for p in model.parameters()) - embedding
    return [len(p) for p in prompts], common_length(prompts), parameters


def sweep(server: Any, model: str, inputs: list[str], requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for concurrency in CONCURRENCY:
        work = (inputs * (requests // len(inputs) + 1))[:requests]
        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda t: timed(lambda: server.classify(model, t)), work))
        elapsed = time.perf_counter() - began
        out[str(concurrency)] = {
            "requestsPerSecond": len(work) / elapsed,
            "p50Ms": percentile(latencies, 0.5),
            "p95Ms": percentile(latencies, 0.95),
        }
    return out


def scoring(
    adapter_uri: str, data: Path, train: Path, rows: int, rounds: int, native_bf16: bool | None
) -> dict[str, Any]:
    """Evaluation's base-model scoring (zero-shot and few-shot, `rows` held-out rows) with the
    numerics `sectune run` uses here, cache off and on; the largest probability difference."""
    from sectune import artifacts, placement
    from sectune.config import JobSpec
    from sectune.data.example import Example
    from sectune.evaluation.scoring import score_labels, with_demonstrations
    from sectune.training import base_model

    uri, sha256 = artifacts.resolve_version(adapter_uri, None)
    spec = JobSpec.model_validate(artifacts.verify(uri, sha256).config)
    numerics = placement.for_training(
        spec.hyperparameters.precision, spec.method.type, "cpu", native_bf16
    )
    model, tokenizer = base_model.load(
        base_model.resolve(spec.base_model), spec.base_model, numerics.weights_dtype, "cpu"
    )
    autocast = numerics.autocast is not None

    def examples(path: Path, n: int) -> list[Example]:
        lines = path.read_text().splitlines()[:n]
        return [Example(f"r{i}", {"text": json.loads(x)["text"]}, json.loads(x)["label"])
                for i, x in enumerate(lines)]  # fmt: skip

    held_out = examples(data, rows)
    sets = {"zeroShot": held_out,
            "fewShot": with_demonstrations(held_out, examples(train, 2000))}  # fmt: skip
    out: dict[str, Any] = {"numerics": numerics.describe()}
    for name, rows_ in sets.items():
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        answers: dict[str, list[list[float]]] = {}
        for _ in range(rounds):
            for mode in ("off", "on"):
                began = time.perf_counter()
                scores = score_labels(model, tokenizer, rows_, spec, autocast=autocast,
                                      prefix_cache=mode == "on")  # fmt: skip
                seconds[mode].append(round(time.perf_counter() - began, 1))
                answers[mode] = scores.probabilities
        out[name] = {
            "seconds": seconds,
            "ratioOffOverOn": round(
                statistics.mean(seconds["off"]) / statistics.mean(seconds["on"]), 3
            ),
            "predictionsChanged": sum(
                x.index(max(x)) != y.index(max(y))
                for x, y in zip(answers["off"], answers["on"], strict=True)
            ),
            "maxProbabilityDifference": max(
                abs(a - b)
                for x, y in zip(answers["off"], answers["on"], strict=True)
                for a, b in zip(x, y, strict=True)
            ),
        }
    return out


def chat_prefill(adapter_uri: str, data: Path, rows: int = 8) -> dict[str, Any]:
    """What caching a chat request's head could save: the prompt's prefill time against the
    whole greedy generation (up to 96 tokens), one request at a time, bf16 weights."""
    import torch
    from peft import PeftModel

    from sectune import artifacts
    from sectune.config import JobSpec
    from sectune.evaluation.prefix import common_length
    from sectune.training import base_model

    uri, sha256 = artifacts.resolve_version(adapter_uri, None)
    spec = JobSpec.model_validate(artifacts.verify(uri, sha256).config)
    model, tokenizer = base_model.load(
        base_model.resolve(spec.base_model), spec.base_model, torch.bfloat16, "cpu"
    )
    model = PeftModel.from_pretrained(model, uri.removeprefix("file://") + "/adapter").eval()

    def prompt(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if spec.task.system_prompt:
            messages.insert(0, {"role": "system", "content": spec.task.system_prompt})
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])

    prompts = [prompt(text) for text in texts(data, rows)]
    prefill, whole = [], []
    with torch.inference_mode():
        for ids in (torch.tensor([p]) for p in prompts):
            began = time.perf_counter()
            model(input_ids=ids)
            prefill.append(time.perf_counter() - began)
            began = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=96,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            whole.append(time.perf_counter() - began)
    return {
        "promptTokensMean": statistics.mean(map(len, prompts)),
        "sharedHeadTokens": common_length(prompts),
        "prefillMsMedian": round(statistics.median(prefill) * 1000, 1),
        "requestMsMedian": round(statistics.median(whole) * 1000, 1),
        "prefillShare": round(statistics.median(prefill) / statistics.median(whole), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="name=URI of a classification adapter")
    parser.add_argument("--data", type=Path, required=True, help="JSONL rows with a text field")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "autocast", "fp32"])
    parser.add_argument("--scoring-train", type=Path, help="training rows: also time evaluation")
    parser.add_argument("--scoring-rows", type=int, default=300)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument(
        "--no-native-bf16",
        dest="native_bf16",
        action="store_const",
        const=False,
        help="score with the numerics chosen on a CPU without native bf16 (float32)",
    )
    parser.add_argument("--chat", help="name=URI of a generation adapter: time its prefill")
    parser.add_argument("--chat-data", type=Path, help="JSONL rows with a text field")
    args = parser.parse_args()
    if args.chat and args.chat_data:
        result = chat_prefill(args.chat.split("=", 1)[1], args.chat_data)
        print(json.dumps({"chat": result}, indent=2), flush=True)
    if args.scoring_train:
        result = scoring(args.adapter.split("=", 1)[1], args.data, args.scoring_train,
                         args.scoring_rows, args.rounds, args.native_bf16)  # fmt: skip
        print(json.dumps({"scoring": result}, indent=2), flush=True)
    if args.skip_serving:
        return

    from training import matmul_peak_gflops

    name, uri = args.adapter.split("=", 1)
    inputs = texts(args.data, 96)
    lengths, head, parameters = prompt_tokens(uri, inputs)
    workdir = Path(tempfile.mkdtemp(prefix="sectune-prefix-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            extra = ["--no-prefix-cache"] if mode == "off" else []
            server = start_server(workdir, ["--adapter", args.adapter, *extra], env={},
                                  precision=args.precision)  # fmt: skip
            try:
                for text in inputs[:8]:  # warm-up (and, with the cache, the head learned)
                    server.classify(name, text).raise_for_status()
                runs[mode].append(sweep(server, name, inputs, args.requests))
            finally:
                server.stop()
    peak = matmul_peak_gflops()
    mean_prompt = statistics.mean(lengths)
    computed = {"off": mean_prompt, "on": mean_prompt - head}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "precision": args.precision,
        "promptTokensMean": round(mean_prompt, 1),
        "sharedHeadTokens": head,
        "nonEmbeddingParameters": parameters,
        "matmulPeakGflops": round(peak, 1),
        "rounds": args.rounds,
    }
    for mode, rounds in runs.items():
        table = {}
        for concurrency in map(str, CONCURRENCY):
            figures = [r[concurrency] for r in rounds]
            rps = statistics.mean(f["requestsPerSecond"] for f in figures)
            gflops = rps * 2 * parameters * computed[mode] / 1e9
            table[concurrency] = {
                "p50Ms": [round(f["p50Ms"], 1) for f in figures],
                "p95Ms": [round(f["p95Ms"], 1) for f in figures],
                "requestsPerSecond": [round(f["requestsPerSecond"], 2) for f in figures],
                "fractionOfMatmulPeak": round(gflops / peak, 3),
            }
        results[mode] = table
    results["throughputRatioOnOverOff"] = {
        c: round(
            statistics.mean(results["on"][c]["requestsPerSecond"])
            / statistics.mean(results["off"][c]["requestsPerSecond"]),
            3,
        )
        for c in map(str, CONCURRENCY)
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
