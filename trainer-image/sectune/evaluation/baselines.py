"""A classical baseline on the same split: TF-IDF word 1-2-grams + class-balanced logistic
regression. An adapter that does not beat it is not worth deploying, and the report says so."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from sectune.data.example import Example
from sectune.evaluation.metrics import classification_metrics, without_leaked


def tfidf_baseline(
    train: list[Example],
    test: list[Example],
    labels: list[str],
    seed: int,
    leaked: AbstractSet[str] = frozenset(),
) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    texts = [" ".join(e.fields.values()) for e in train if not e.canary]
    targets = [e.target for e in train if not e.canary]
    if len(set(targets)) < 2:
        return {"skipped": "fewer than two labels in the training data"}
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
        LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed),
    )
    model.fit(texts, targets)
    test_texts = [" ".join(e.fields.values()) for e in test]
    probs_known = model.predict_proba(test_texts)
    classes = list(model.classes_)
    probabilities = [
        [float(row[classes.index(label)]) if label in classes else 0.0 for label in labels]
        for row in probs_known
    ]
    predicted = [str(p) for p in model.predict(test_texts)]
    metrics = classification_metrics([e.target for e in test], predicted, labels, probabilities)
    return metrics | without_leaked(test, predicted, labels, leaked)
