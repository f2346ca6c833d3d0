"""Serving latency and throughput of `sectune serve` on this machine.

Starts the server on the given adapters (all on one base model), then measures

- cold start: process start to /readyz 200 (base model + adapters loaded and verified),
- /v1/classify: single-request latency p50/p95/p99 (sequential), then throughput and p95 with
  1, 4, 8 and 16 requests in flight, and the mean batch the server formed (from /metrics),
- mixed adapters: classify requests for one adapter and chat requests for another in flight
  together (each kind batched across adapters),
- /v1/chat/completions: latency and completion tokens/s for greedy answers.

    python benchmarks/serving_latency.py \\
        --classify attack-tactics=file://runs/attack-tactics \\
        --classify-data examples/attack-tactics/data/validation.jsonl \\
        --chat log-parsing=file://runs/log-parsing \\
        --chat-data examples/log-parsing/data/validation.jsonl

Results go in BENCHMARKS.md. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.serving import SectuneServer, start_server  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def texts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [row["text"] for row in rows]


def timed(call: Any) -> float:
    began = time.perf_counter()
    response = call()
    response.raise_for_status()
    return (time.perf_counter() - began) * 1000


def batch_mean(server: SectuneServer, kind: str) -> tuple[float, float]:
    return (
        server.metric("sectune_serve_batch_size_sum", kind=kind) or 0.0,
        server.metric("sectune_serve_batch_size_count", kind=kind) or 0.0,
    )


def classify_sweep(
    server: SectuneServer, model: str, inputs: list[str], requests: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    single = [timed(lambda t=t: server.classify(model, t)) for t in inputs[:50]]
    out["single"] = {
        "p50Ms": percentile(single, 0.5),
        "p95Ms": percentile(single, 0.95),
        "p99Ms": percentile(single, 0.99),
    }
    for concurrency in (1, 4, 8, 16):
        work = (inputs * (requests // len(inputs) + 1))[:requests]
        before = batch_mean(server, "classify")
        began = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(lambda t: timed(lambda: server.classify(model, t)), work))
        elapsed = time.perf_counter() - began
        after = batch_mean(server, "classify")
        batches = after[1] - before[1]
        out[f"concurrency{concurrency}"] = {
            "requestsPerSecond": len(work) / elapsed,
            "p50Ms": percentile(latencies, 0.5),
            "p95Ms": percentile(latencies, 0.95),
            "meanBatch": (after[0] - before[0]) / batches if batches else 0.0,
        }
    return out


def chat(server: SectuneServer, model: str, text: str) -> tuple[float, int]:
    began = time.perf_counter()
    response = server.post(
        "/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 96},
    )
    response.raise_for_status()
    return (time.perf_counter() - began) * 1000, int(response.json()["usage"]["completion_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classify", required=True, help="name=URI of a classification adapter")
    parser.add_argument("--classify-data", type=Path, required=True)
    parser.add_argument("--chat", help="name=URI of an extraction/generation adapter")
    parser.add_argument("--chat-data", type=Path)
    parser.add_argument("--requests", type=int, default=160, help="requests per concurrency level")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "autocast", "fp32"])
    args = parser.parse_args()

    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="sectune-serving-bench-"))
    adapters = ["--adapter", args.classify] + (["--adapter", args.chat] if args.chat else [])
    began = time.perf_counter()
    server = start_server(workdir, adapters, env={}, precision=args.precision)
    cold_start = time.perf_counter() - began
    classify_model = args.classify.split("=", 1)[0]
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "precision": args.precision,
        "coldStartSeconds": cold_start,
    }
    try:
        inputs = texts(args.classify_data, 100)
        server.classify(classify_model, inputs[0]).raise_for_status()  # warm-up
        results["classify"] = classify_sweep(server, classify_model, inputs, args.requests)
        if args.chat and args.chat_data:
            chat_model = args.chat.split("=", 1)[0]
            lines = texts(args.chat_data, 16)
            chat(server, chat_model, lines[0])  # warm-up
            single = [chat(server, chat_model, line) for line in lines[:8]]
            results["chat"] = {
                "p50Ms": percentile([ms for ms, _ in single], 0.5),
                "completionTokensPerSecond": sum(n for _, n in single)
                / (sum(ms for ms, _ in single) / 1000),
            }
            before = batch_mean(server, "generate")
            began = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                classified = pool.map(
                    lambda t: timed(lambda: server.classify(classify_model, t)), inputs[:48]
                )
                chatted = pool.map(lambda line: chat(server, chat_model, line), lines[:8])
                mixed_classify, mixed_chat = list(classified), list(chatted)
            after = batch_mean(server, "generate")
            results["mixed"] = {
                "seconds": time.perf_counter() - began,
                "classifyP95Ms": percentile(mixed_classify, 0.95),
                "chatP50Ms": statistics.median(ms for ms, _ in mixed_chat),
                "meanGenerateBatch": (after[0] - before[0]) / max(after[1] - before[1], 1),
            }
    finally:
        server.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
