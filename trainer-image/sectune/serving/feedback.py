"""Analysts' verdicts on served predictions: the predictions held for joining, the verdict a
client posts, the record stored, and the writer that stores records in batches.

Every /v1/classify, /v1/chat/completions and /v1/completions answer carries an `id`. The
server holds what it needs to join a verdict to that answer (adapter, version, prediction,
scores, a digest of the input, and the input itself, in memory only) for
`feedback.windowMinutes`; `POST /v1/feedback` with the id and the analyst's verdict then:

1. is refused, naming the field, when the id is unknown or expired, the label is not one of
   the task's labels, or the caller's key may not use the adapter (nothing stored);
2. is sanitized with the adapter's own training-time sanitizer (`dataset.sanitize` of the job
   that trained it) and written to `feedback.store` as one JSONL line in the training format;
3. is acknowledged only after the object holding it is written (group commit: every
   `batchSize` verdicts or `flushSeconds`, whichever comes first). A pod killed mid-batch has
   acknowledged none of that batch's verdicts, so none is lost; the client's retry of the same
   verdict is idempotent.

Storage layout: `<store>/<adapter>/date=<YYYY-MM-DD>/<UTC time>-<random>.jsonl`, each object
written whole (S3 PUT; a renamed file on file://).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sectune import storage
from sectune.config import SanitizeSpec
from sectune.contract import FeedbackRecord, timestamp
from sectune.serving.config import FeedbackSettings
from sectune.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

MAX_COMMENT_CHARS = 2000
MAX_OUTPUT_CHARS = 64_000
ID_PREFIX = "pred-"

Verdict = Literal["accepted", "rejected"]


def new_id(prefix: str = "", replica: str = "") -> str:
    """An unguessable answer id (a caller cannot post verdicts on ids it was not given); with
    peers, `replica` is the answering replica's tag (sectune.serving.peers)."""
    return (prefix or ID_PREFIX) + replica + secrets.token_hex(12)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Prediction:
    """One served answer, as held until its window ends."""

    id: str
    adapter: str
    version: str
    task: str
    """classification, extraction or generation."""
    output: str
    """The predicted label, or the generated text."""
    sanitize: SanitizeSpec
    """The adapter's training-time sanitizer settings: verdicts are redacted as its data was."""
    labels: tuple[str, ...] = ()
    probabilities: dict[str, float] | None = None
    fields: dict[str, str] | None = None
    """/v1/classify's input fields."""
    messages: tuple[dict[str, str], ...] | None = None
    """/v1/chat/completions' messages (with the system prompt the server added)."""
    prompt: str | None = None
    """/v1/completions' prompt."""
    at: float = field(default_factory=time.time)

    @property
    def input_text(self) -> str:
        if self.fields is not None:
            return json.dumps(self.fields, sort_keys=True)
        if self.messages is not None:
            return json.dumps(list(self.messages))
        return self.prompt or ""

    @property
    def input_sha256(self) -> str:
        return digest(self.input_text)

    @property
    def size(self) -> int:
        """Characters held (what bounds the log's memory)."""
        return len(self.input_text) + len(self.output)


# ---------------------------------------------------------------------------- the request


class VerdictRequest(BaseModel):
    """What `POST /v1/feedback` takes."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)
    """The `id` of the answer being judged."""
    label: str | None = Field(None, min_length=1, max_length=200)
    """Classification: the correct label (the predicted one when the analyst agrees)."""
    verdict: Verdict | None = None
    """accepted or rejected. Classification: accepted means the predicted label was right."""
    output: str | None = Field(None, min_length=1, max_length=MAX_OUTPUT_CHARS)
    """Generation and extraction: the corrected answer, when the analyst wrote one."""
    reviewer: str | None = Field(None, min_length=1, max_length=200)
    """Who decided (an analyst or a playbook id), kept with the verdict for audit."""
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)
    """Why; sanitized like the input before it is stored."""


class FeedbackError(Exception):
    """A verdict refused; status, message and the field at fault."""

    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Judgement:
    """A verdict checked against its prediction: what the analyst said it should have been."""

    prediction: Prediction
    request: VerdictRequest
    actual: str
    """Classification: the correct label. Generation: accepted or rejected."""
    caller: str
    at: float = field(default_factory=time.time)

    @property
    def correct(self) -> bool:
        if self.prediction.task == "classification":
            return self.actual == self.prediction.output
        return self.actual == "accepted"

    @property
    def fingerprint(self) -> str:
        """What makes two posts the same verdict (idempotency)."""
        r = self.request
        return digest(json.dumps([self.actual, r.output, r.reviewer, r.comment]))


def judge(prediction: Prediction, request: VerdictRequest, caller: str) -> Judgement:
    """The verdict in terms of the prediction's task; FeedbackError naming the field when it
    does not fit (a label not in the task's labels, a label on a generation answer)."""
    if request.label is None and request.verdict is None and request.output is None:
        field_name = "label" if prediction.task == "classification" else "verdict"
        raise FeedbackError(
            422, "give label (classification) or verdict (accepted or rejected)", field_name
        )
    if prediction.task == "classification":
        if request.output is not None:
            raise FeedbackError(
                422, "output is for generation answers; give the correct label", "output"
            )
        if request.label is not None:
            if request.label not in prediction.labels:
                raise FeedbackError(
                    422,
                    f"label {request.label[:200]!r} is not one of the adapter's labels: "
                    + ", ".join(prediction.labels),
                    "label",
                )
            if request.verdict == "accepted" and request.label != prediction.output:
                raise FeedbackError(
                    422,
                    "verdict accepted with a label other than the predicted one; send the "
                    "correct label alone",
                    "verdict",
                )
            return Judgement(prediction, request, request.label, caller)
        if request.verdict == "accepted":
            return Judgement(prediction, request, prediction.output, caller)
        raise FeedbackError(
            422, "a rejected classification needs the correct label: give label", "label"
        )
    if request.label is not None:
        raise FeedbackError(
            422, f"label is for classification; this is a {prediction.task} answer", "label"
        )
    verdict = request.verdict or "rejected"  # a corrected output alone rejects the answer
    if verdict == "accepted" and request.output is not None:
        raise FeedbackError(
            422, "an accepted answer takes no corrected output; send verdict rejected", "output"
        )
    return Judgement(prediction, request, verdict, caller)


# ---------------------------------------------------------------------------- held predictions


@dataclass
class Held:
    prediction: Prediction
    verdict: str | None = None
    """Fingerprint of the verdict taken (stored or being stored)."""
    stored: Future[None] | None = None
    shadows: dict[str, str] = field(default_factory=dict)
    """What shadow versions answered, by version: a verdict judges them too."""


class PredictionLog:
    """Predictions held for `window` seconds, at most `max_predictions` of them and
    `max_chars` characters in all; the oldest go first. Used from the event loop only."""

    def __init__(self, window: float, max_predictions: int, max_chars: int = 256 << 20) -> None:
        self.window = window
        self.max_predictions = max_predictions
        self.max_chars = max_chars
        self._held: OrderedDict[str, Held] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, prediction: Prediction) -> None:
        self._expire(prediction.at)
        self._held[prediction.id] = Held(prediction)
        self._chars += prediction.size
        while self._held and (
            len(self._held) > self.max_predictions or self._chars > self.max_chars
        ):
            self._drop_oldest()

    def get(self, prediction_id: str, now: float | None = None) -> Held | None:
        self._expire(time.time() if now is None else now)
        return self._held.get(prediction_id)

    def _expire(self, now: float) -> None:
        while self._held:
            oldest = next(iter(self._held.values()))
            if now - oldest.prediction.at <= self.window:
                return
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        _, held = self._held.popitem(last=False)
        self._chars -= held.prediction.size


# ---------------------------------------------------------------------------- the stored record


def build_record(judgement: Judgement, sanitizer: Any) -> FeedbackRecord:
    """The stored row for a verdict, redacted by `sanitizer` (one placeholder numbering
    for the whole row, as training data is)."""
    p, r = judgement.prediction, judgement.request
    texts: dict[str, str] = {}
    if p.fields is not None:
        texts.update({f"field:{k}": v for k, v in p.fields.items()})
    for i, message in enumerate(p.messages or ()):
        texts[f"message:{i}"] = message["content"]
    if p.prompt is not None:
        texts["prompt"] = p.prompt
    if p.task != "classification":
        texts["answer"] = p.output
    if r.output is not None:
        texts["corrected"] = r.output
    if r.comment:
        texts["comment"] = r.comment
    clean = sanitizer.redact(texts)
    meta: dict[str, Any] = {
        "adapter": p.adapter,
        "version": p.version,
        "task": p.task,
        "predicted": p.output if p.task == "classification" else clean["answer"],
        "verdict": "accepted" if judgement.correct else "rejected",
        "inputSha256": p.input_sha256,
        "predictedAt": timestamp(p.at),
        "judgedAt": timestamp(judgement.at),
        "caller": judgement.caller,
    }
    if p.probabilities is not None:
        meta["probabilities"] = p.probabilities
    if r.reviewer:
        meta["reviewer"] = r.reviewer
    if r.comment:
        meta["comment"] = clean["comment"]
    row: dict[str, Any] = {"id": p.id, "feedback": meta}
    # the answer to learn from: the correct label, the corrected output, or the accepted one
    kept = clean.get("corrected") or (clean.get("answer") if judgement.correct else None)
    if p.fields is not None:
        row.update({k: clean[f"field:{k}"] for k in p.fields})
        row["label"] = judgement.actual
    elif p.messages is not None:
        messages = [
            {"role": m["role"], "content": clean[f"message:{i}"]} for i, m in enumerate(p.messages)
        ]
        if kept is not None:
            messages.append({"role": "assistant", "content": kept})
        row["messages"] = messages
    else:
        row["prompt"] = clean["prompt"]
        if kept is not None:
            row["completion"] = kept
    return FeedbackRecord.model_validate(row)


# ---------------------------------------------------------------------------- the writer


@dataclass
class _Pending:
    judgement: Judgement
    done: Future[None]
    queued: float = field(default_factory=time.monotonic)


class FeedbackWriter:
    """Stores verdicts in batches on a thread of its own; `submit` returns a future that
    completes when the verdict's object is written (or fails with the storage error)."""

    def __init__(self, settings: FeedbackSettings, metrics: ServingMetrics) -> None:
        if settings.store is None:
            raise ValueError("a FeedbackWriter needs feedback.store")
        self.store = settings.store.rstrip("/")
        self.batch_size = settings.batch_size
        self.flush_seconds = settings.flush_seconds
        self.metrics = metrics
        self._pending: list[_Pending] = []
        self._sanitizers: dict[str, Any] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sectune-feedback", daemon=True)
        self._thread.start()

    def submit(self, judgement: Judgement) -> Future[None]:
        done: Future[None] = Future()
        with self._wake:
            if self._closed:
                done.set_exception(RuntimeError("the server is shutting down"))
                return done
            self._pending.append(_Pending(judgement, done))
            self._wake.notify()
        return done

    def close(self) -> None:
        """Write what is pending and stop (called on shutdown, after requests have drained)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                while 0 < len(self._pending) < self.batch_size and not self._closed:
                    left = self._pending[0].queued + self.flush_seconds - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                batch = self._pending[: self.batch_size]
                del self._pending[: self.batch_size]
                if not batch and self._closed:
                    return
            self._write(batch)

    def _sanitizer(self, prediction: Prediction) -> Any:
        from sectune.data.sanitize import Sanitizer

        key = f"{prediction.adapter}@{prediction.version}"
        if key not in self._sanitizers:
            self._sanitizers[key] = Sanitizer(prediction.sanitize)
        return self._sanitizers[key]

    def _write(self, batch: list[_Pending]) -> None:
        by_adapter: dict[str, list[_Pending]] = {}
        for item in batch:
            by_adapter.setdefault(item.judgement.prediction.adapter, []).append(item)
        for adapter, items in by_adapter.items():
            try:
                lines = [
                    build_record(i.judgement, self._sanitizer(i.judgement.prediction)).line()
                    for i in items
                ]
                now = time.time()
                name = (
                    f"{self.store}/{adapter}/date={time.strftime('%Y-%m-%d', time.gmtime(now))}/"
                    f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}-{secrets.token_hex(4)}"
                    ".jsonl"
                )
                storage.write_bytes(name, ("\n".join(lines) + "\n").encode())
            except Exception as exc:
                log.error("cannot store %d verdicts for %s: %s", len(items), adapter, exc)
                self.metrics.feedback_writes.labels("failed").inc(len(items))
                for item in items:
                    item.done.set_exception(exc)
                continue
            self.metrics.feedback_writes.labels("stored").inc(len(items))
            for item in items:
                item.done.set_result(None)
