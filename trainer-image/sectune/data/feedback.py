"""Analysts' verdicts as training data (`dataset.feedback`): every JSONL object under the
adapter's folder of a feedback store, read after the held-out split so that no verdict is ever
evaluated on, and left out when:

- it is older than `maxAgeDays` (expired);
- a newer verdict on the same input exists (the latest decision wins: superseded);
- it gives no answer to learn from (a rejected generated reply without a correction: noReply);
- its label is not one of the job's labels (unknownLabel), or its shape is not the job's
  format (wrongFormat);
- its input is a held-out row's input (heldOutOverlapping): training on it would put the
  answer to a test question into training.

Of what is left, the newest `holdOut` share is kept out of training as the verdicts' own
held-out set (gates with `basis: verdicts`); the rest is repeated `weight` times (seeded) and
added to the training split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from sectune import storage
from sectune.config import FeedbackSource, JobSpec
from sectune.contract import FeedbackRecord
from sectune.data.example import Example
from sectune.data.load import MAX_DATA_BYTES

DAY = 86_400.0


@dataclass
class FeedbackData:
    examples: list[Example]
    """The verdicts to train on, once each (`weighted` repeats them)."""
    held_out: list[Example] = field(default_factory=list)
    """The newest verdicts, kept out of training (dataset.feedback.holdOut)."""
    report: dict[str, Any] = field(default_factory=dict)
    """What `sources.feedback` of the data report says: uri, objects, rows, used, the rows
    left out by reason, weight, and sha256 over the objects read (the data stage adds
    `examples`: how many training examples the weighted verdicts became)."""

    @property
    def sha256(self) -> str:
        return str(self.report.get("sha256", ""))


def input_key(example: Example) -> str:
    """What an example asks, without its answer, normalised (the held-out overlap check)."""
    asked = [*example.fields.values(), *(m["content"] for m in (example.messages or [])[:-1])]
    return " ".join(" ".join(asked).lower().split())


def load_feedback(
    source: FeedbackSource, spec: JobSpec, held_out: list[Example], now: float | None = None
) -> FeedbackData:
    now = time.time() if now is None else now
    prefix = source.uri.rstrip("/")
    names = sorted(n for n in storage.list_files(prefix) if n.endswith(".jsonl"))
    digest = hashlib.sha256()
    left_out: Counter[str] = Counter()
    newest: dict[str, tuple[float, Example]] = {}
    rows = 0
    for name in names:
        data = storage.read_bytes(f"{prefix}/{name}", MAX_DATA_BYTES)
        digest.update(name.encode() + b"\0" + data)
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            rows += 1
            try:
                record = FeedbackRecord.model_validate_json(line)
            except ValidationError:
                left_out["invalid"] += 1
                continue
            judged = record.judged_at
            if judged is None or now - judged > source.max_age_days * DAY:
                left_out["expired"] += 1
                continue
            example, reason = _example(record, spec)
            if example is None:
                left_out[reason] += 1
                continue
            example.where = f"{prefix}/{name}:{number}"
            key = str(record.feedback.get("inputSha256") or input_key(example))
            if key in newest:
                left_out["superseded"] += 1
                if newest[key][0] > judged:
                    continue
            newest[key] = (judged, example)
    held = {input_key(e) for e in held_out}
    examples = []
    for _, example in sorted(newest.values(), key=lambda pair: pair[0]):
        if input_key(example) in held:
            left_out["heldOutOverlapping"] += 1
        else:
            examples.append(example)
    kept = round(len(examples) * source.hold_out)
    examples, held_out = examples[: len(examples) - kept], examples[len(examples) - kept :]
    report: dict[str, Any] = {
        "uri": source.uri,
        "objects": len(names),
        "rows": rows,
        "used": len(examples),
        "heldOut": len(held_out),
        "weight": source.weight,
        "leftOut": dict(sorted(left_out.items())),
        "sha256": digest.hexdigest(),
    }
    return FeedbackData(examples, held_out, report)


def _example(record: FeedbackRecord, spec: JobSpec) -> tuple[Example | None, str]:
    """The training example a verdict gives the job's format, or why it gives none."""
    if spec.dataset.format == "classification":
        fields = record.input_fields
        if record.label is None or not fields:
            return None, "wrongFormat"
        if record.label not in spec.task.labels:
            return None, "unknownLabel"
        return Example(record.id, fields, record.label), ""
    messages = record.messages
    if not messages:
        return None, "wrongFormat"
    if messages[-1].get("role") != "assistant":
        return None, "noReply"
    return Example(record.id, {}, messages[-1]["content"], messages), ""


def weighted(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """Each example `int(weight)` times, plus a seeded share `weight % 1` of them once more
    (below 1: only that share)."""
    whole, part = int(weight), weight - int(weight)
    out = [
        dataclasses.replace(e, id=e.id if copy == 0 else f"{e.id}~{copy}")
        for e in examples
        for copy in range(whole)
    ]
    extra = random.Random(seed).sample(examples, round(part * len(examples)))
    out += [dataclasses.replace(e, id=f"{e.id}~{whole}") for e in extra]
    return out
