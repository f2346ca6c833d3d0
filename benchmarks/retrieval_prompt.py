"""A retrieval-augmented prompt for a classification example, measured before it is built: each
row's text is preceded by the labels of its k nearest training rows (TF-IDF cosine; a training
row never retrieves itself), which hands the model what nearest-neighbour word statistics know.

First the offline ceiling of that information on the held-out rows (no model involved): TF-IDF
+ class-balanced logistic regression (the report's baseline), a k-nearest-neighbour vote, and the
same logistic regression given the neighbours' labels as extra features. Then, with --out, the
augmented data and a copy of the example manifest to train on it:

    python benchmarks/retrieval_prompt.py --example examples/alert-triage --k 3 --out /tmp/rag
    sectune run /tmp/rag/finetunejob-cpu.yaml
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from sectune.evaluation.scoring import nearest
from sectune.yamlio import dump_yaml, load_yaml


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def offline_ceiling(
    train: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    labels: list[str],
    near: dict[str, list[list[int]]],
) -> dict[str, float]:
    """Macro-F1 on the held-out rows of TF-IDF alone, the neighbours' vote alone, and TF-IDF
    with the neighbours' labels as features (what a retrieval prompt adds, at best linearly)."""
    import numpy as np
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    texts, targets = [r["text"] for r in train], [r["label"] for r in train]
    truth = [r["label"] for r in held_out]
    k = len(near["validation"][0])
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    words = vectorizer.fit_transform(texts)
    held_words = vectorizer.transform([r["text"] for r in held_out])

    def one_hot(rows: list[list[int]]) -> Any:
        features = np.zeros((len(rows), len(labels) * k))  # one label slot per rank
        for i, row in enumerate(rows):
            for rank, j in enumerate(row):
                features[i, rank * len(labels) + labels.index(targets[j])] = 1.0
        return features

    def fit_score(train_matrix: Any, held_matrix: Any) -> float:
        model = LogisticRegression(max_iter=3000, class_weight="balanced", random_state=42)
        model.fit(train_matrix, targets)
        return float(f1_score(truth, model.predict(held_matrix), average="macro"))

    vote = [Counter(targets[j] for j in row).most_common(1)[0][0] for row in near["validation"]]
    return {
        "tfidf": fit_score(words, held_words),
        f"vote of {k} nearest": float(f1_score(truth, vote, average="macro")),
        f"tfidf + labels of {k} nearest": fit_score(
            sparse.hstack([words, one_hot(near["train"])]).tocsr(),
            sparse.hstack([held_words, one_hot(near["validation"])]).tocsr(),
        ),
    }


def augmented(rows: list[dict[str, Any]], near: list[list[int]], targets: list[str]) -> list[Any]:
    return [
        {**row, "text": f"Similar rules rated: {', '.join(targets[j] for j in idx)}\n{row['text']}"}
        for row, idx in zip(rows, near, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--example", type=Path, default=Path("examples/alert-triage"))
    parser.add_argument("--manifest", default="finetunejob-cpu.yaml")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the augmented data and manifest here")
    args = parser.parse_args()

    manifest = load_yaml((args.example / args.manifest).read_text())
    labels = list(manifest["spec"]["task"]["labels"])
    train = read_rows(args.example / "data" / "train.jsonl")
    held_out = read_rows(args.example / "data" / "validation.jsonl")
    texts, targets = [r["text"] for r in train], [r["label"] for r in train]
    near = {
        "train": nearest(texts, None, args.k),
        "validation": nearest(texts, [r["text"] for r in held_out], args.k),
    }
    for name, score in offline_ceiling(train, held_out, labels, near).items():
        print(f"{name:32s} macro-F1 {score:.3f}")
    if args.out is None:
        return

    (args.out / "data").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", held_out)):
        lines = [json.dumps(row) for row in augmented(rows, near[name], targets)]
        (args.out / "data" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    manifest["metadata"]["name"] = f"{manifest['metadata']['name']}-retrieval"
    (args.out / args.manifest).write_text(dump_yaml(manifest))
    print(f"sectune run {args.out / args.manifest}")


if __name__ == "__main__":
    main()
