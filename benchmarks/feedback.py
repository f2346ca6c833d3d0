"""What analysts' verdicts cost a server: /v1/classify latency with and without a feedback store
(every answer then held for joining), and how many verdicts a second /v1/feedback takes.

    python benchmarks/feedback.py --adapter attack-tactics=file://runs/attack-tactics \\
        --data examples/attack-tactics/data/validation.jsonl --rounds 2

Each round starts the server twice, without and with `--feedback-store` (alternating, so the
machine's drift falls on both sides), and sends the same requests one at a time. Then, with
the store, it posts one verdict per answer from `--clients` threads at once and reports
verdicts/s and the acknowledgement latency (a verdict is acknowledged once its batch is
written: at most about `flushSeconds`, 0.25 s by default). Results go in BENCHMARKS.md. Not a
test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
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

from support.serving import SectuneServer, start_server  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def classify_all(
    server: SectuneServer, model: str, texts: list[str]
) -> tuple[list[float], list[Any]]:
    latencies, answers = [], []
    for text in texts:
        began = time.perf_counter()
        response = server.classify(model, text)
        response.raise_for_status()
        latencies.append((time.perf_counter() - began) * 1000)
        answers.append(response.json())
    return latencies, answers


def post_verdicts(server: SectuneServer, answers: list[Any], clients: int) -> dict[str, float]:
    def post(answer: Any) -> float:
        began = time.perf_counter()
        response = server.post("/v1/feedback", {"id": answer["id"], "label": answer["label"]})
        response.raise_for_status()
        return (time.perf_counter() - began) * 1000

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        acks = list(pool.map(post, answers))
    seconds = time.perf_counter() - began
    return {
        "verdicts": len(acks),
        "verdictsPerSecond": len(acks) / seconds,
        "ackP50Ms": percentile(acks, 0.5),
        "ackP95Ms": percentile(acks, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="name=URI of a classification adapter")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with a text field")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16, help="verdict posters at once")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "autocast", "fp32"])
    args = parser.parse_args()
    name = args.adapter.partition("=")[0]
    rows = [json.loads(line) for line in args.data.read_text().splitlines()[: args.requests]]
    texts = [row["text"] for row in rows]
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    ingest: list[dict[str, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="sectune-feedback-bench-"))
    for round_ in range(args.rounds):
        for side in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
            extra = ["--feedback-store", f"file://{workdir}/store-{round_}"] if side == "on" else []
            server = start_server(
                workdir, ["--adapter", args.adapter, *extra], {}, precision=args.precision
            )
            try:
                server.classify(name, texts[0]).raise_for_status()  # warm
                latencies, answers = classify_all(server, name, texts)
                results[side].append(
                    {
                        "p50": percentile(latencies, 0.5),
                        "p95": percentile(latencies, 0.95),
                        "mean": statistics.fmean(latencies),
                    }
                )
                if side == "on":
                    ingest.append(post_verdicts(server, answers, args.clients))
            finally:
                server.stop()
            print(side, results[side][-1], ingest[-1] if side == "on" else "", flush=True)
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.precision}",
        "requests": len(texts),
        "rounds": args.rounds,
        "classify": {
            side: {k: statistics.fmean(r[k] for r in runs) for k in ("p50", "p95", "mean")}
            for side, runs in results.items()
        },
        "p95Ratio": [
            on["p95"] / off["p95"] for on, off in zip(results["on"], results["off"], strict=True)
        ],
        "ingest": ingest,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
