"""Drift of what is served against what the adapter was trained and evaluated on.

Two scores per adapter version, both the Jensen-Shannon divergence (base 2, so in [0, 1]) of a
sliding window of requests against a reference: 0 when the served mix matches, 1 when they
share nothing.
- Predictions (classification): the reference is the tuned model's predicted-label mix on the
  held-out test set (the column sums of the report's confusion matrix).
- Inputs (every task type): the reference is the mix of prompt lengths, in power-of-two token
  buckets, of the held-out examples, recorded in the lineage manifest at training time. Alerts
  sent by a new log source, a template that changed, or pasted documents in place of alerts
  move it long before anyone reads the answers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque

from sectune.contract import AdapterManifest, RunReport


def reference_distribution(report: RunReport) -> dict[str, float] | None:
    """Predicted-label shares of the tuned model in a report, or None (not classification)."""
    confusion = report.tuned.get("confusionMatrix")
    if not confusion:
        return None
    labels, matrix = confusion["labels"], confusion["matrix"]
    predicted = [sum(row[j] for row in matrix) for j in range(len(labels))]
    total = sum(predicted)
    if not total:
        return None
    return {label: count / total for label, count in zip(labels, predicted, strict=True)}


LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Upper bounds (exclusive) of the prompt-length buckets, in tokens; longer is the last bucket."""


def length_bucket(tokens: int) -> str:
    """The bucket a prompt of `tokens` tokens falls into, e.g. "<64" or ">=4096"."""
    for bound in LENGTH_BUCKETS:
        if tokens < bound:
            return f"<{bound}"
    return f">={LENGTH_BUCKETS[-1]}"


def length_distribution(lengths: list[int]) -> dict[str, float] | None:
    """Shares of prompt lengths per bucket (what the manifest records), or None without any."""
    if not lengths:
        return None
    counts = Counter(length_bucket(n) for n in lengths)
    return {bucket: count / len(lengths) for bucket, count in sorted(counts.items())}


def input_reference(manifest: AdapterManifest) -> dict[str, float] | None:
    """The prompt-length reference a manifest recorded (None for versions trained before it)."""
    reference = manifest.reference.get("promptTokens")
    if not isinstance(reference, dict) or not reference:
        return None
    try:
        shares = {str(k): float(v) for k, v in reference.items()}
    except (TypeError, ValueError):
        return None
    return shares if sum(shares.values()) > 0 else None


def js_divergence(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon divergence in bits between two distributions over labels."""
    labels = set(p) | set(q)
    mixture = {k: (p.get(k, 0.0) + q.get(k, 0.0)) / 2 for k in labels}

    def kl(a: dict[str, float]) -> float:
        return sum(a[k] * math.log2(a[k] / mixture[k]) for k in labels if a.get(k, 0.0) > 0)

    return max(0.0, min(1.0, (kl(p) + kl(q)) / 2))


class DriftMonitor:
    """Predictions of one adapter version over a sliding window, and their drift score.

    Counts are kept per slice of 1/60 of the window, so memory stays bounded whatever the
    request rate (and whether or not anyone scrapes the score)."""

    SLICES = 60

    def __init__(
        self, reference: dict[str, float], window_seconds: float, min_requests: int
    ) -> None:
        self.reference = reference
        self.window_seconds = window_seconds
        self.min_requests = min_requests
        self._width = window_seconds / self.SLICES
        self._slices: deque[tuple[float, Counter[str]]] = deque()
        self._lock = threading.Lock()

    def _forget(self, now: float) -> None:
        while self._slices and self._slices[0][0] < now - self.window_seconds:
            self._slices.popleft()

    def record(self, label: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        start = now - now % self._width
        with self._lock:
            self._forget(now)
            if not self._slices or self._slices[-1][0] != start:
                self._slices.append((start, Counter()))
            self._slices[-1][1][label] += 1

    def score(self, now: float | None = None) -> float | None:
        """The drift score over the window, or None with too few predictions to say."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._forget(now)
            counts: Counter[str] = sum((c for _, c in self._slices), Counter())
        total = sum(counts.values())
        if total < self.min_requests:
            return None
        return js_divergence({k: v / total for k, v in counts.items()}, self.reference)
