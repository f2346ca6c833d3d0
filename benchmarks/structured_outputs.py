"""Structured outputs on the CPU path: format compliance free and held to the schema, and what
holding costs per generated token, through `sectune serve` as clients call it.

    python benchmarks/structured_outputs.py --adapter log-parsing=file://runs/log-parsing \\
        --manifest examples/log-parsing/finetunejob.yaml \\
        --data examples/log-parsing/data/validation.jsonl --rows 32 --rounds 2

For the base model (no adapter: it was never taught the format) and the adapter, the same chat
requests (the job's system prompt, one log line each, greedy, 128 tokens at most) are sent one
at a time free (`response_format: {"type": "text"}`) and held to the job's `outputSchema`
(`response_format` json_schema; the adapter holds to it by default), alternating which side goes
first each round. Reported: format and schema compliance (sectune's extraction metrics), and
milliseconds per completion token, free and held. Then the grammar engines alone: llguidance's
token mask per step on this tokenizer, and xgrammar's when it is installed (`pip install
xgrammar`), the like-for-like alternative. Results go in BENCHMARKS.md. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "trainer-image"))

from sectune.config import load_manifest  # noqa: E402
from sectune.evaluation.metrics import extraction_metrics  # noqa: E402
from support.serving import SectuneServer, start_server  # noqa: E402


def ask(server: SectuneServer, model: str, system: str, line: str, schema: Any) -> dict[str, Any]:
    response_format = (
        {"type": "text"}
        if schema is None
        else {"type": "json_schema", "json_schema": {"name": "log", "schema": schema}}
    )
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": line}],
        "max_tokens": 128,
        "temperature": 0,
        "response_format": response_format,
    }
    began = time.perf_counter()
    response = server.post("/v1/chat/completions", body)
    response.raise_for_status()
    answer = response.json()
    return {
        "seconds": time.perf_counter() - began,
        "tokens": answer["usage"]["completion_tokens"],
        "text": answer["choices"][0]["message"]["content"].strip(),
        "cut": answer["choices"][0]["finish_reason"] == "length",
    }


def side(
    server: SectuneServer,
    model: str,
    system: str,
    rows: list[dict[str, Any]],
    schema: dict[str, Any],
    held: bool,
) -> dict[str, Any]:
    """One pass over the rows, free or held to `schema`; compliance is judged on `schema`."""
    answers = [ask(server, model, system, row["text"], schema if held else None) for row in rows]
    metrics = extraction_metrics(
        [a["text"] for a in answers], [row["fields"] for row in rows], schema
    )
    tokens = sum(a["tokens"] for a in answers)
    finished = [a for a in answers if not a["cut"]]
    return {
        "formatCompliance": metrics["formatCompliance"],
        "schemaCompliance": metrics["schemaCompliance"],
        # Answers that ended by themselves, not cut at max_tokens, and their compliance: a
        # held answer cut short is an unfinished document.
        "finished": len(finished) / len(answers),
        "finishedSchemaCompliance": extraction_metrics(
            [a["text"] for a in finished],
            [row["fields"] for row, a in zip(rows, answers, strict=True) if not a["cut"]],
            schema,
        )["schemaCompliance"]
        if finished
        else None,
        "fieldF1": metrics["fieldF1"],
        "msPerToken": 1000 * sum(a["seconds"] for a in answers) / max(tokens, 1),
        "tokens": tokens,
    }


def walk(
    targets: list[list[int]],
    compile_ms: float,
    matcher: Callable[[], Any],
    fill: Callable[[Any], None],
    consume: Callable[[Any, int], bool],
) -> dict[str, Any]:
    """Time `fill` (one next-token mask) at every step of every reference answer."""
    spent, steps, accepted = 0.0, 0, 0
    for target in targets:
        state, ok = matcher(), True
        for token in target:
            began = time.perf_counter()
            fill(state)
            spent += time.perf_counter() - began
            steps += 1
            ok = ok and consume(state, token)
        accepted += ok
    return {
        "compileMs": compile_ms,
        "maskUs": 1e6 * spent / steps,
        "referencesAccepted": f"{accepted}/{len(targets)}",
    }


def masks(tokenizer_dir: str, schema: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each engine's next-token mask per step, walking the reference answers."""
    import llguidance
    import llguidance.torch
    from transformers import AutoTokenizer

    from sectune.constrained import compiled_grammar, vocabulary

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    targets = [
        [*tokenizer.encode(row["fields"], add_special_tokens=False), tokenizer.eos_token_id]
        for row in rows
    ]
    began = time.perf_counter()
    grammar = compiled_grammar(schema, tokenizer)
    compile_ms = 1000 * (time.perf_counter() - began)
    vocab = vocabulary(tokenizer)
    mask = llguidance.torch.allocate_token_bitmask(1, vocab.vocab_size)
    out = {
        "llguidance": walk(
            targets,
            compile_ms,
            lambda: llguidance.LLMatcher(vocab, grammar),
            lambda m: llguidance.torch.fill_next_token_bitmask(m, mask, 0),
            lambda m, token: bool(m.consume_token(token)),
        )
    }
    try:
        import xgrammar
    except ImportError:
        return out
    began = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(schema), any_whitespace=False
    )
    compile_ms = 1000 * (time.perf_counter() - began)
    bitmask = xgrammar.allocate_token_bitmask(1, info.vocab_size)
    out["xgrammar"] = walk(
        targets,
        compile_ms,
        lambda: xgrammar.GrammarMatcher(compiled),
        lambda m: m.fill_next_token_bitmask(bitmask, 0),
        lambda m, token: bool(m.accept_token(token)),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="name=URI of an extraction adapter")
    parser.add_argument("--manifest", type=Path, required=True, help="its FineTuneJob")
    parser.add_argument("--data", type=Path, required=True, help="JSONL with text and fields")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "autocast", "fp32"])
    args = parser.parse_args()
    spec = load_manifest(args.manifest).spec
    schema = spec.task.output_schema
    assert schema is not None, "the manifest's task needs an outputSchema"
    system = spec.task.system_prompt or ""
    name = args.adapter.partition("=")[0]
    rows = [json.loads(line) for line in args.data.read_text().splitlines()[: args.rows]]
    workdir = Path(tempfile.mkdtemp(prefix="sectune-structured-bench-"))
    server = start_server(workdir, ["--adapter", args.adapter], {}, precision=args.precision)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        ask(server, name, system, rows[0]["text"], schema)  # warm
        for round_ in range(args.rounds):
            for model in ("base", name):
                for held in (False, True) if round_ % 2 == 0 else (True, False):
                    key = f"{model} {'held' if held else 'free'}"
                    run = side(server, model, system, rows, schema, held)
                    results.setdefault(key, []).append(run)
                    print(key, results[key][-1], flush=True)
    finally:
        server.stop()
    base_dir = str(Path(spec.base_model.uri.removeprefix("file://")).expanduser())
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {args.precision}",
        "rows": len(rows),
        "rounds": args.rounds,
        "served": {
            key: {
                k: statistics.fmean(r[k] for r in runs) if runs[0][k] is not None else None
                for k in runs[0]
            }
            for key, runs in results.items()
        },
        "grammarEngines": masks(base_dir, schema, rows),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
