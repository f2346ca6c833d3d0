"""The data audit, measured on data nobody here wrote (examples/attack-tactics: MITRE ATT&CK
procedure examples; examples/alert-triage: Sigma rules).

    python benchmarks/data_audit.py flips      # planted 5 % label flips: recall and precision,
                                               # sectune's filter against the cleanlab default,
                                               # over seeds
    python benchmarks/data_audit.py leakage    # planted edited copies of every held-out row
    python benchmarks/data_audit.py shipped    # suspected errors in the shipped training sets,
                                               # the 20 most suspect printed to be read by hand
    python benchmarks/data_audit.py pays       # the quick profile trained on clean data, on 5 %
                                               # flips, and on the flips cleaned by the audit
                                               # (three `sectune run`s, ~10 min each on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sectune.config import load_manifest  # noqa: E402
from sectune.data.audit import audit, out_of_fold_probabilities  # noqa: E402
from sectune.data.example import Example  # noqa: E402
from support.edits import EDITS, edited_copy  # noqa: E402

ATTACK = ROOT / "examples" / "attack-tactics"
SIGMA = ROOT / "examples" / "alert-triage"


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _examples(rows: list[dict[str, Any]]) -> list[Example]:
    return [Example(str(r["id"]), {"text": r["text"]}, r["label"]) for r in rows]


def flip(rows: list[dict[str, Any]], labels: list[str], share: float, seed: int) -> set[str]:
    """Flip `share` of the rows to another label at random (in place); returns their ids."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(rows)), int(share * len(rows)))
    for i in chosen:
        rows[i]["label"] = rng.choice([x for x in labels if x != rows[i]["label"]])
    return {str(rows[i]["id"]) for i in chosen}


def base_model_embeddings(texts: list[str], model_dir: Path) -> Any:
    """Mean-pooled last hidden states of the demo base model (SmolLM2-135M-Instruct)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            encoded = tokenizer(
                [texts[i] for i in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=128,
            )
            hidden = model(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            out[batch] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return out


def _embedding_probabilities(embeddings: Any, y: list[int], seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.05))
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    return cross_val_predict(model, embeddings, y, cv=cv, method="predict_proba")


def cmd_flips(args: argparse.Namespace) -> None:
    from cleanlab.filter import find_label_issues

    spec = load_manifest(ATTACK / "finetunejob-full.yaml").spec
    labels = spec.task.labels
    embeddings = None
    if args.embeddings:
        started = time.monotonic()
        texts = [r["text"] for r in _rows(ATTACK / "data" / "train.jsonl")]
        embeddings = base_model_embeddings(texts, Path(args.embeddings).expanduser())
        print(f"(base-model embeddings: {time.monotonic() - started:.0f} s)", file=sys.stderr)
    print("| seed | features | filter | flagged | recall | precision | precision among the top k |")
    print("|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        rows = _rows(ATTACK / "data" / "train.jsonl")
        planted = flip(rows, labels, 0.05, seed)
        ids = [str(r["id"]) for r in rows]
        y = [labels.index(r["label"]) for r in rows]
        started = time.monotonic()
        tfidf = out_of_fold_probabilities([r["text"] for r in rows], y, seed)
        seconds = time.monotonic() - started
        runs = [("TF-IDF", name, tfidf) for name in ("prune_by_noise_rate", "both")]
        if embeddings is not None:
            runs.append(("base model", "both", _embedding_probabilities(embeddings, y, seed)))
        for features, name, probabilities in runs:
            ranked = find_label_issues(
                y, probabilities, filter_by=name, return_indices_ranked_by="self_confidence"
            )
            found = {ids[i] for i in ranked}
            top = {ids[i] for i in ranked[: len(planted)]}
            hit = len(found & planted)
            chosen = " (sectune)" if (features, name) == ("TF-IDF", "both") else ""
            print(
                f"| {seed} | {features} | {name}{chosen} | {len(found)} "
                f"| {hit / len(planted):.3f} | {hit / max(1, len(found)):.3f} "
                f"| {len(top & planted) / len(planted):.3f} |"
            )
        print(
            f"(out-of-fold TF-IDF probabilities, {len(rows)} rows: {seconds:.0f} s)",
            file=sys.stderr,
        )


def cmd_leakage(args: argparse.Namespace) -> None:
    spec = load_manifest(ATTACK / "finetunejob-full.yaml").spec
    train = _rows(ATTACK / "data" / "train.jsonl")
    held = _rows(ATTACK / "data" / "validation.jsonl")
    before = audit(_examples(train), _examples(held), spec)
    print(
        f"shipped: {before.leaked_total} of {len(held)} held-out rows nearly duplicate a "
        f"training row ({before.leaked_total / len(held):.3f}); near-duplicates within "
        f"training {before.near_duplicates_total}, conflicting {before.conflicts_total}"
    )
    for how, name in enumerate(EDITS):
        copies = [
            {"id": f"copy-{i}", "text": edited_copy(r["text"], how), "label": r["label"]}
            for i, r in enumerate(held)
        ]
        started = time.monotonic()
        after = audit(_examples(train + copies), _examples(held), spec)
        seconds = time.monotonic() - started
        found = len({pair.id for pair in after.leaked})
        to_copy = sum(1 for pair in after.leaked if pair.other.startswith("copy-"))
        print(
            f"{name}: {found} of {len(held)} held-out rows found leaking ({to_copy} matched to "
            f"their planted copy first; {seconds:.0f} s for the audit of "
            f"{len(train) + len(copies)} training rows)"
        )


def cmd_shipped(args: argparse.Namespace) -> None:
    for folder, manifest in ((ATTACK, "finetunejob-full.yaml"), (SIGMA, "finetunejob-cpu.yaml")):
        spec = load_manifest(folder / manifest).spec
        rows = _rows(folder / "data" / "train.jsonl")
        field = spec.dataset.fields.text
        examples = [Example(str(r["id"]), {"text": str(r[field])}, r["label"]) for r in rows]
        result = audit(examples, _examples_of(folder, field), spec)
        print(
            f"## {folder.name}: {result.label_errors_total} of {len(rows)} training rows are "
            f"suspected label errors; near-duplicates {result.near_duplicates_total}, "
            f"conflicting {result.conflicts_total}, leaked held-out {result.leaked_total} of "
            f"{result.held_out_rows}"
        )
        by_id = {str(r["id"]): r for r in rows}
        for issue in result.label_errors[: args.show]:
            text = re.sub(r"\s+", " ", str(by_id[issue.id][field]))[:220]
            print(
                f"- {issue.id}: given {issue.given!r}, suggested {issue.suggested!r} "
                f"({issue.confidence:.2f}): {text}"
            )


def _examples_of(folder: Path, field: str) -> list[Example]:
    return [
        Example(str(r["id"]), {"text": str(r[field])}, r["label"])
        for r in _rows(folder / "data" / "validation.jsonl")
    ]


def _run(manifest: Path, out: Path) -> dict[str, Any]:
    started = time.monotonic()
    subprocess.run(["sectune", "run", str(manifest), "--output", f"file://{out}"], check=False)
    reports = sorted(out.glob("**/report.json"))
    if not reports:
        raise SystemExit(f"{manifest}: no report written")
    report = json.loads(reports[-1].read_text())
    tuned = report["models"]["tuned"]
    return {
        "accuracy": tuned["accuracy"],
        "macroF1": tuned["macroF1"],
        "tfidfMacroF1": report["models"].get("tfidf", {}).get("macroF1"),
        "minutes": (time.monotonic() - started) / 60,
    }


def cmd_pays(args: argparse.Namespace) -> None:
    from sectune.yamlio import dump_yaml, load_yaml

    spec = load_manifest(ATTACK / "finetunejob.yaml").spec
    labels = spec.task.labels
    work = Path(tempfile.mkdtemp(prefix="sectune-audit-pays-"))
    clean = _rows(ATTACK / "data" / "train.jsonl")
    noisy = [dict(r) for r in clean]
    planted = flip(noisy, labels, 0.05, args.seeds[0])
    result = audit(_examples(noisy), [], spec)
    cleaned, relabelled, dropped = [], 0, 0
    suspects = {i.id: i for i in result.label_errors}
    for row in noisy:
        issue = suspects.get(str(row["id"]))
        if issue is None:
            cleaned.append(row)
        elif issue.confidence >= args.relabel_above:
            cleaned.append(row | {"label": issue.suggested})
            relabelled += 1
        else:
            dropped += 1
    restored = sum(
        1
        for row, original in zip(noisy, clean, strict=True)
        if str(row["id"]) in planted
        and suspects.get(str(row["id"]))
        and suspects[str(row["id"])].suggested == original["label"]
    )
    print(
        f"planted {len(planted)} flips; the audit flagged {len(suspects)} rows: relabelled "
        f"{relabelled} (suggestion's probability >= {args.relabel_above}), dropped {dropped}; "
        f"{restored} planted flips got their original label back"
    )
    document = load_yaml((ATTACK / "finetunejob.yaml").read_text())
    results = {}
    for name, rows in (("clean", clean), ("5 % flipped", noisy), ("flipped, cleaned", cleaned)):
        data = work / f"{name.replace(' ', '-').replace('%', 'pct').replace(',', '')}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        document["spec"]["dataset"]["train"] = f"file://{data}"
        document["spec"]["dataset"]["validation"] = f"file://{ATTACK / 'data' / 'validation.jsonl'}"
        document["spec"]["evaluation"] = document["spec"].get("evaluation", {}) | {
            "baseline": False,
            "injectionProbes": False,
        }
        manifest = data.with_suffix(".yaml")
        manifest.write_text(dump_yaml(document))
        results[name] = _run(manifest, work / f"out-{data.stem}")
        print(name, results[name], flush=True)
    print("| training data | accuracy | macro-F1 | TF-IDF macro-F1 (same rows) | minutes |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['macroF1']:.3f} | {r['tfidfMacroF1']:.3f} "
            f"| {r['minutes']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("flips", "leakage", "shipped", "pays"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--show", type=int, default=20)
    parser.add_argument("--relabel-above", type=float, default=0.6)
    parser.add_argument(
        "--embeddings",
        help="flips: also try the base model's representations (a model folder, e.g. "
        "~/.cache/sectune/models/SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args()
    {"flips": cmd_flips, "leakage": cmd_leakage, "shipped": cmd_shipped, "pays": cmd_pays}[
        args.part
    ](args)


if __name__ == "__main__":
    main()
