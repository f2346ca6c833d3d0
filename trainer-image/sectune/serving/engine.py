"""The model worker: one thread owns the model; requests for any adapters share its batches.

Handlers submit work and wait on a future. The worker takes the first waiting item, gathers more
for up to `max_wait_ms` (or until `max_batch`), and runs each kind in one pass: every row names
its own adapter (PEFT mixed-adapter batches), so a batch may mix adapters and the base model.
Adapter loads and unloads run on the same thread, between batches, so a forward pass never sees
the model change under it.

One tenant cannot hold up or fail the others: work waits at most `max_queue_seconds` before it is
refused (503, retry); work whose client has gone (`abandon`) is dropped before it runs and stops
generating if it is running; a batch is split so that rows x longest prompt stays within
`max_batch_tokens` (one long prompt is not padded onto every short one); and when a batch fails,
its rows are retried one by one so only the row that fails gets the error.

A classify batch for one adapter starts after the cached keys and values of the tokens all of
that adapter's prompts share (system prompt, template head; sectune.evaluation.prefix), dropped
when the adapter is loaded or unloaded under its key. Mixed-adapter batches and labels that
need their whole sequence scored run whole prompts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from sectune import placement
from sectune.constrained import SchemaConstrained
from sectune.evaluation.prefix import PrefixCache
from sectune.evaluation.scoring import last_logprobs, sequence_logprobs
from sectune.serving.metrics import ServingMetrics
from sectune.training.objectives import left_pad

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"
"""PEFT's name for "no adapter" in a mixed batch."""


@dataclass
class _Request:
    adapter_key: str
    prompt: list[int]
    tenant: str = field(default="", kw_only=True)
    """Who asked (the API key id): the worker takes work round-robin between tenants."""
    queued_at: float = field(default_factory=time.monotonic, kw_only=True)
    abandoned: bool = field(default=False, kw_only=True)
    """Set by the handler when its client has gone or its deadline passed."""
    future: Future[Any] = field(default_factory=Future, kw_only=True)

    def abandon(self) -> None:
        self.abandoned = True
        self.future.cancel()  # only takes effect while still queued


@dataclass
class ClassifyWork(_Request):
    label_ids: list[list[int]]
    """Each label's target ids; when their first tokens are distinct only those are scored."""
    distinct_first_tokens: bool


@dataclass
class GenerateWork(_Request):
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer (not included in it), as OpenAI's `stop`."""
    seed: int | None = None
    """Seeds sampling when the request is the first of its batch (best effort, as OpenAI's)."""
    on_token: Callable[[int], None] | None = None
    """Called on the model's thread with each new token, as it is generated (streaming)."""
    grammar: str | None = None
    """Held to this grammar (sectune.constrained), e.g. a JSON Schema's; None: free."""


@dataclass
class ControlWork:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    finish_reason: str
    """"stop" (end of turn or a stop string) or "length" (max_tokens reached)."""
    text: str
    """The answer as text, cut before the stop string that ended it."""


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it, and whether one was found."""
    found = [text.index(s) for s in stops if s and s in text]
    return (text[: min(found)], True) if found else (text, False)


def safe_to_send(text: str, stops: list[str]) -> str:
    """What of a growing answer can be sent now: cut at a stop string, and without a tail
    that may be the start of one (sent once the next tokens show it is not)."""
    text, stopped = cut_at_stop(text, stops)
    if stopped:
        return text
    held = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held]


Work = ClassifyWork | GenerateWork | ControlWork


class Overloaded(RuntimeError):
    """The work waited longer than the queue allows; the client should retry later."""


class FairQueue:
    """The worker's queue: one FIFO lane per tenant, taken round-robin, so one key's flood of
    requests fills at most its share of each batch and never queues ahead of everyone else.
    Control work (adapter loads, shutdown) has its own lane and goes first."""

    def __init__(self) -> None:
        self._lanes: dict[str, deque[Work | None]] = {}
        self._control: deque[Work | None] = deque()
        self._ready = threading.Condition()

    def put(self, work: Work | None) -> None:
        with self._ready:
            if work is None or isinstance(work, ControlWork):
                self._control.append(work)
            else:
                self._lanes.setdefault(work.tenant, deque()).append(work)
            self._ready.notify()

    def get(self, timeout: float | None = None) -> Work | None:
        """The next item; queue.Empty when none arrives within `timeout` (None: wait)."""
        with self._ready:
            if not self._ready.wait_for(self._waiting, timeout):
                raise queue.Empty
            if self._control:
                return self._control.popleft()
            tenant = next(iter(self._lanes))
            lane = self._lanes.pop(tenant)
            item = lane.popleft()
            if lane:  # back of the line: the other tenants go first
                self._lanes[tenant] = lane
            return item

    def _waiting(self) -> bool:
        return bool(self._control or self._lanes)


class AdapterGone(RuntimeError):
    """The adapter version a request was routed to was unloaded before it ran; retry."""

    def __init__(self, key: str) -> None:
        super().__init__(f"adapter {key} was unloaded before the request ran; retry it")


class Engine:
    """Owns the model and tokenizer; runs submitted work in batches on one thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        metrics: ServingMetrics,
        autocast: bool = True,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_batch_tokens: int = 16_384,
        max_queue_seconds: float = 30.0,
        prefix_cache: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.autocast = autocast
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_seconds = max_queue_seconds
        self.prefixes = PrefixCache() if prefix_cache else None
        """Cached prompt heads per adapter key (touched on the model thread only)."""
        self._queue = FairQueue()
        self._thread = threading.Thread(target=self._loop, name="sectune-model", daemon=True)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self.model.eval()
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def has_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + generated) one sequence may hold."""
        config = getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", 0) or 2048)

    def submit(self, work: Work) -> Future[Any]:
        if not self.alive:
            work.future.set_exception(RuntimeError("the model worker is not running"))
        else:
            self._queue.put(work)
        return work.future

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model thread between batches; return its result (or raise)."""
        return self.submit(ControlWork(fn)).result()

    def load_adapter(self, directory: str, key: str) -> None:
        def load() -> None:
            from peft import PeftModel

            self._forget(key)
            if self.has_adapters:
                self.model.load_adapter(directory, adapter_name=key)
            else:
                self.model = PeftModel.from_pretrained(self.model, directory, adapter_name=key)
            self.model.eval()

        self.call(load)

    def unload_adapter(self, key: str) -> None:
        def unload() -> None:
            self._forget(key)
            # PEFT keeps at least one adapter on a PeftModel; the last one simply stays unused.
            if (
                self.has_adapters
                and key in self.model.peft_config
                and len(self.model.peft_config) > 1
            ):
                self.model.delete_adapter(key)

        self.call(unload)

    def _forget(self, key: str) -> None:
        """The model state under `key` changes: its cached head goes. Loading the first adapter
        wraps the base model, so the base model's goes too."""
        if self.prefixes is not None:
            self.prefixes.drop(key)
            self.prefixes.drop(BASE_ADAPTER)

    # ------------------------------------------------------------------ worker

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[Work] = [first]
            if not isinstance(first, ControlWork):
                deadline = time.monotonic() + self.max_wait
                while len(batch) < self.max_batch:
                    try:  # a timeout of 0 takes only what is already waiting
                        item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                    except queue.Empty:
                        break
                    if item is None:
                        self._queue.put(None)
                        break
                    batch.append(item)
                    if isinstance(item, ControlWork):
                        break
            self._run(batch)

    def _loaded(self, key: str) -> bool:
        if self.has_adapters:
            return key == BASE_ADAPTER or key in self.model.peft_config
        return key == BASE_ADAPTER

    def _admit(self, work: Work) -> bool:
        """Whether `work` should run now: not cancelled, not waiting too long, its adapter
        still loaded (a version unloaded just after routing fails this request alone)."""
        if not work.future.set_running_or_notify_cancel():
            return False  # its client went away while it was queued
        if isinstance(work, ControlWork):
            return True
        if time.monotonic() - work.queued_at > self.max_queue_seconds:
            work.future.set_exception(Overloaded("the request waited too long in the queue"))
            return False
        if not self._loaded(work.adapter_key):
            work.future.set_exception(AdapterGone(work.adapter_key))
            return False
        return True

    def _run(self, batch: list[Work]) -> None:
        batch = [w for w in batch if self._admit(w)]
        classify = [w for w in batch if isinstance(w, ClassifyWork)]
        generate = [w for w in batch if isinstance(w, GenerateWork)]
        for chunk in self._by_token_budget(classify):
            self._guard(chunk, self._classify)
        groups: dict[tuple[float, float], list[GenerateWork]] = {}
        for item in generate:
            groups.setdefault((item.temperature, item.top_p), []).append(item)
        for group in groups.values():
            for chunk in self._by_token_budget(group):
                self._guard(chunk, self._generate)
        for control in batch:
            if isinstance(control, ControlWork):
                try:
                    control.future.set_result(control.fn())
                except Exception as exc:
                    control.future.set_exception(exc)

    def _by_token_budget(self, works: list[Any]) -> list[list[Any]]:
        """Sub-batches of similar length whose padded size (rows x longest row, generated
        tokens included) stays within `max_batch_tokens`; a row alone may exceed it."""
        chunks: list[list[Any]] = []
        for work in sorted(works, key=_padded_length):
            if chunks and (len(chunks[-1]) + 1) * _padded_length(work) <= self.max_batch_tokens:
                chunks[-1].append(work)
            else:
                chunks.append([work])
        return chunks

    def _guard(self, works: list[Any], run: Callable[[list[Any]], None]) -> None:
        try:
            with torch.inference_mode(), self._amp():
                run(works)
        except Exception as exc:
            if len(works) > 1:  # find the row that fails; the others get their answers
                log.warning("batch of %d failed (%s); running its rows one by one", len(works), exc)
                for work in works:
                    if not work.future.done():
                        self._guard([work], run)
                return
            log.exception("request failed")
            if not works[0].future.done():
                works[0].future.set_exception(exc)

    def _amp(self) -> Any:
        return placement.autocast(next(self.model.parameters()).device.type, self.autocast)

    def _names(self, works: list[ClassifyWork] | list[GenerateWork]) -> list[str] | None:
        """Per-row adapter names for a mixed batch. A batch for one adapter instead makes it
        the active adapter and runs the plain forward pass (measurably faster than PEFT's
        per-row routing, which splits every LoRA layer's input by adapter)."""
        if not self.has_adapters:
            return None
        keys = {w.adapter_key for w in works}
        if len(keys) == 1 and BASE_ADAPTER not in keys:
            key = keys.pop()
            if self.model.active_adapter != key:
                self.model.set_adapter(key)
            return None
        return [w.adapter_key for w in works]

    def _classify(self, works: list[ClassifyWork]) -> None:
        fast = [w for w in works if w.distinct_first_tokens]
        if fast:
            self.metrics.batch_size.labels("classify").observe(len(fast))
            logprobs = last_logprobs(
                self.model,
                [w.prompt for w in fast],
                self.tokenizer.pad_token_id,
                self.prefixes,
                fast[0].adapter_key,
                self._names(fast),
            )
            for row, work in zip(logprobs, fast, strict=True):
                first = [ids[0] for ids in work.label_ids]
                work.future.set_result(row[first].softmax(-1).tolist())
        for work in works:
            if work.distinct_first_tokens:
                continue
            self.metrics.batch_size.labels("classify").observe(1)
            names = self._names([work])
            scores = sequence_logprobs(
                self.model, [work.prompt], work.label_ids, self.tokenizer.pad_token_id, names
            )
            work.future.set_result(scores[0].softmax(-1).tolist())

    def _generate(self, works: list[GenerateWork]) -> None:
        self.metrics.batch_size.labels("generate").observe(len(works))
        batch = left_pad([w.prompt for w in works], self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        sampling = works[0].temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(w.max_new_tokens for w in works),
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if sampling:
            kwargs |= {"temperature": works[0].temperature, "top_p": works[0].top_p}
            if works[0].seed is not None:
                torch.manual_seed(works[0].seed)
        progress = _Progress(works, self.tokenizer)
        kwargs["stopping_criteria"] = StoppingCriteriaList([progress])
        if any(w.grammar is not None for w in works):
            constrained = SchemaConstrained(self.tokenizer, [w.grammar for w in works])
            kwargs["logits_processor"] = LogitsProcessorList([constrained])
        names = self._names(works)
        if names is not None:
            kwargs["adapter_names"] = names
        output = self.model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            **kwargs,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        for row, (tokens, work) in enumerate(zip(new_tokens, works, strict=True)):
            tokens, finish = tokens[: work.max_new_tokens], "length"
            if row in progress.stopped:
                tokens, finish = progress.generated[row], "stop"
            elif eos in tokens:
                tokens, finish = tokens[: tokens.index(eos)], "stop"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            work.future.set_result(Generated(tokens, finish, cut_at_stop(text, work.stop)[0]))


def _padded_length(work: ClassifyWork | GenerateWork) -> int:
    extra = work.max_new_tokens if isinstance(work, GenerateWork) else 1
    return len(work.prompt) + extra


class _Progress(StoppingCriteria):
    """Called after every generated token: hands each row's new token to its listener
    (streaming), ends a row at a stop string or when its client has gone (the batch ends when
    every row is done), so a vanished client does not hold the model."""

    def __init__(self, works: list[GenerateWork], tokenizer: Any) -> None:
        super().__init__()
        self.works = works
        self.tokenizer = tokenizer
        self.generated: list[list[int]] = [[] for _ in works]
        self.ended = [False] * len(works)
        self.stopped: set[int] = set()
        """Rows ended by a stop string."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        newest = input_ids[:, -1].tolist()
        for row, (work, token) in enumerate(zip(self.works, newest, strict=True)):
            if self.ended[row]:
                continue
            if token == self.tokenizer.eos_token_id or work.abandoned:
                self.ended[row] = True
                continue
            self.generated[row].append(token)
            if work.on_token is not None:
                work.on_token(token)
            if work.stop:
                text = self.tokenizer.decode(self.generated[row], skip_special_tokens=True)
                if cut_at_stop(text, work.stop)[1]:
                    self.ended[row] = True
                    self.stopped.add(row)
        return torch.tensor(
            [e or w.abandoned for e, w in zip(self.ended, self.works, strict=True)],
            device=input_ids.device,
        )
