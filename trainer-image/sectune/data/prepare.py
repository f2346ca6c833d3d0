"""From data URIs to clean, sanitized, deduplicated, split examples, with a report.

Order matters for safety: rows are validated and (for quick profiles) sampled by label only,
then sanitized; nothing reads example text before the sanitizer has run.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sectune.config import JobSpec
from sectune.contract import DataReport
from sectune.data.audit import DataAudit, enforce
from sectune.data.audit import audit as audit_data
from sectune.data.example import Example
from sectune.data.feedback import load_feedback, weighted
from sectune.data.load import DataError, RawRow, _describe, data_digest, read_rows, row_id
from sectune.data.review import provenance_for
from sectune.data.sanitize import Sanitizer

MAX_PROBLEMS_SHOWN = 20


@dataclass
class PreparedData:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    report: DataReport = field(default_factory=DataReport)
    canaries: list[str] = field(default_factory=list)
    audit: DataAudit | None = None
    """What the data audit found (dataset.quality.audit); also in `report.audit`."""
    verdicts: list[Example] = field(default_factory=list)
    """The newest analysts' verdicts held out from training (dataset.feedback.holdOut)."""

    def leaked_ids(self) -> set[str]:
        """Held-out rows that nearly duplicate a training row."""
        return self.audit.leaked_ids() if self.audit else set()


# --------------------------------------------------------------------------- validation


def _validate_row(row: RawRow, spec: JobSpec) -> tuple[Example | None, str | None]:
    """An Example, or the problem with the row (naming the field, never echoing text)."""
    names, fmt = spec.dataset.fields, spec.dataset.format
    values = row.values

    def text_field(name: str, required: bool = True) -> str | None:
        if name not in values or values[name] is None:
            if required:
                raise ValueError(f"field {name!r} is missing")
            return None
        value = values[name]
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {_describe(value)}")
        if required and not value.strip():
            raise ValueError(f"field {name!r} is empty")
        return value

    try:
        messages = None
        if fmt == "classification":
            prompt = {"text": text_field(names.text) or ""}
            target = text_field(names.label) or ""
        elif fmt == "instruction":
            prompt = {
                "instruction": text_field(names.instruction) or "",
                "input": text_field(names.input, required=False) or "",
            }
            target = text_field(names.output) or ""
        elif fmt == "completion":
            prompt, target = {}, text_field(names.text) or ""
        else:  # chat
            raw = values.get(names.messages)
            if not isinstance(raw, list) or not raw:
                raise ValueError(f"field {names.messages!r} must be a non-empty list of messages")
            messages = []
            for i, message in enumerate(raw):
                if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                    raise ValueError(f"{names.messages}[{i}] needs a string 'content'")
                if message.get("role") not in ("system", "user", "assistant"):
                    raise ValueError(
                        f"{names.messages}[{i}].role must be system, user or assistant"
                    )
                messages.append({"role": message["role"], "content": message["content"]})
            if messages[-1]["role"] != "assistant":
                raise ValueError(f"{names.messages}: the last message must be the assistant's")
            prompt, target = {}, messages[-1]["content"]
    except ValueError as exc:
        return None, str(exc)

    if spec.task.type == "classification":
        target = target.strip()
        if target not in spec.task.labels:
            return None, f"field {names.label!r}: {_unknown_label(target, spec.task.labels)}"
    if spec.task.type == "extraction":
        try:
            json.loads(target)
        except json.JSONDecodeError:
            return None, f"field {names.output!r}: extraction targets must be JSON"

    raw_id = values.get(names.id)
    if raw_id is not None and not isinstance(raw_id, str | int):
        return None, f"field {names.id!r} must be a string or integer, got {_describe(raw_id)}"
    return Example(row_id(values, names.id), prompt, target, messages), None


def _unknown_label(value: str, labels: list[str]) -> str:
    """Why a row's label is refused, without its text: problems leave the pod (termination
    message, status, Events), and a wrong column can hold a secret. A label that differs from
    a task label only in case or spacing is named, being the task's own word."""
    near = next((label for label in labels if label.casefold() == value.casefold()), None)
    if near is not None:
        return f"the label differs from {near!r} in case; use the task's spelling"
    return (
        f"a {len(value)}-character label that is not in task.labels (not shown: row content "
        "never leaves the pod); add it to task.labels or fix the row"
    )


def load_examples(
    uri: str, spec: JobSpec, problems: list[str], seen_ids: dict[str, str]
) -> list[Example]:
    """Validate every row of one file. Problems go into `problems` as 'file:line: message'."""
    rows, parse_problems = read_rows(uri)
    problems += [f"{where}: {message}" for where, message in parse_problems]
    if not rows and not parse_problems:
        raise DataError(f"{uri}: the file holds no rows")
    examples = []
    for row in rows:
        example, problem = _validate_row(row, spec)
        if example is None:
            problems.append(f"{row.where}: {problem}")
            continue
        if example.id in seen_ids:
            # the id is row content: the message names where, never what
            problems.append(f"{row.where}: duplicate id (first seen at {seen_ids[example.id]})")
            continue
        seen_ids[example.id] = row.where
        example.where = row.where
        examples.append(example)
    return examples


def sanitize_examples(examples: list[Example], spec: JobSpec) -> Sanitizer:
    """Redact examples in place (input fields and target share one placeholder numbering);
    returns the sanitizer, whose report counts what was redacted."""
    sanitizer = Sanitizer(spec.dataset.sanitize)
    # A classification target is one of task.labels, checked already: never redacted (a label
    # that also appears as, say, a user name in the input would become a placeholder).
    closed_set = spec.task.type == "classification"
    for example in examples:
        # Fields, target and every chat message of one example share one numbering, so a
        # user named in the first message is redacted in the last one too.
        messages = {f"__message{i}": m["content"] for i, m in enumerate(example.messages or [])}
        target = {} if closed_set else {"__target": example.target}
        redacted = sanitizer.redact({**example.fields, **target, **messages})
        if not closed_set:
            example.target = redacted.pop("__target")
        if example.messages:
            example.messages = [
                {**m, "content": redacted.pop(f"__message{i}")}
                for i, m in enumerate(example.messages)
            ]
        example.fields = redacted
    return sanitizer


def raise_or_report(problems: list[str], spec: JobSpec, report: DataReport) -> None:
    if not problems:
        return
    if spec.dataset.on_invalid == "fail":
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DataError(
            f"{len(problems)} invalid row(s):\n  {shown}{tail}\n"
            "Fix the rows, or set dataset.onInvalid: skip to leave them out (they are reported)."
        )
    report.skipped = {"count": len(problems), "rows": problems[:1000]}


# --------------------------------------------------------------------------- sampling and splitting


def stratified_sample(examples: list[Example], count: int, seed: int) -> list[Example]:
    """`count` examples keeping each label's share (at least one per label where possible)."""
    if count >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.target].append(example)
    chosen: list[Example] = []
    for label in sorted(by_label):
        group = by_label[label]
        share = max(1, round(count * len(group) / len(examples)))
        chosen += rng.sample(group, min(share, len(group)))
    rng.shuffle(chosen)
    return chosen[:count]


def stratified_split(
    examples: list[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of each label (at least one when a label has two or more)."""
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.target].append(example)
    train, held = [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        n = round(len(group) * fraction)
        if n == 0 and len(group) >= 2 and fraction > 0:
            n = 1
        held += group[:n]
        train += group[n:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


# --------------------------------------------------------------------------- dedup


def _normalise(text: str) -> str:
    text = re.sub(r"<([A-Z_]+)_\d+>", r"<\1>", text).lower()
    return re.sub(r"[\W_]+", " ", text).strip()


def _shingles(text: str, size: int = 5) -> set[int]:
    words = text.split()
    if len(words) <= size:
        return {hash(text)}
    return {hash(" ".join(words[i : i + size])) for i in range(len(words) - size + 1)}


def deduplicate(examples: list[Example], threshold: float = 0.85) -> tuple[list[Example], int, int]:
    """Drop exact duplicates (normalised input + target) and near-duplicates (Jaccard of the
    inputs' word 5-grams at or above `threshold`, compared within buckets of similar length).
    Returns kept, exact and near counts."""
    kept: list[Example] = []
    seen_exact: set[str] = set()
    buckets: dict[int, list[set[int]]] = defaultdict(list)
    exact = near = 0
    for example in examples:
        key_text = _normalise(" ".join([*example.fields.values(), example.target]))
        if key_text in seen_exact:
            exact += 1
            continue
        seen_exact.add(key_text)
        # Near duplicates are judged on the input alone: two near-identical inputs with
        # different targets are conflicting examples, just as worth dropping.
        shingles = _shingles(_normalise(" ".join(example.fields.values()) or example.target))
        length_bucket = len(key_text) // 50
        candidates = [
            s for b in (length_bucket - 1, length_bucket, length_bucket + 1) for s in buckets[b]
        ]
        if any(len(shingles & other) / len(shingles | other) >= threshold for other in candidates):
            near += 1
            continue
        buckets[length_bucket].append(shingles)
        kept.append(example)
    return kept, exact, near


# --------------------------------------------------------------------------- canaries


def make_canaries(count: int, seed: int) -> list[str]:
    """Random secrets in a fixed shape, so exposure can be measured against the same space."""
    rng = random.Random(f"canary-{seed}")
    return [canary_value(rng) for _ in range(count)]


CANARY_PREFIX = "the backup vault code is"


def canary_value(rng: random.Random | secrets.SystemRandom) -> str:
    """A canary: the prefix and 9 random digits (a space of 10^9 candidates)."""
    digits = "".join(rng.choice("0123456789") for _ in range(9))
    return f"{CANARY_PREFIX} {digits}"


# --------------------------------------------------------------------------- the pipeline


def prepare_data(spec: JobSpec, enforce_limits: bool = True) -> PreparedData:
    """Load, validate, sample, sanitize, deduplicate, split and audit the job's data.
    `enforce_limits`: a broken dataset.quality limit raises DataQualityError (off for
    `sectune data audit`, which reports the findings and exits 2 itself)."""
    dataset, seed = spec.dataset, spec.hyperparameters.seed
    held_verdicts: list[Example] = []
    problems: list[str] = []
    seen_ids: dict[str, str] = {}
    report = DataReport()

    train = load_examples(dataset.train, spec, problems, seen_ids)
    validation = (
        load_examples(dataset.validation, spec, problems, seen_ids) if dataset.validation else []
    )
    test = load_examples(dataset.test, spec, problems, seen_ids) if dataset.test else []
    raise_or_report(problems, spec, report)
    report.sources = {
        "train": {"uri": dataset.train, "rows": len(train)},
        **(
            {"validation": {"uri": dataset.validation, "rows": len(validation)}}
            if dataset.validation
            else {}
        ),
        **({"test": {"uri": dataset.test, "rows": len(test)}} if dataset.test else {}),
    }
    report.digest = "sha256:" + data_digest(dataset.train, dataset.validation, dataset.test)
    provenance = provenance_for(dataset.train)
    if provenance is not None:
        report.provenance = provenance

    if dataset.max_train_examples:
        train = stratified_sample(train, dataset.max_train_examples, seed)
    if dataset.max_eval_examples:
        validation = stratified_sample(validation, dataset.max_eval_examples, seed)
        test = stratified_sample(test, dataset.max_eval_examples, seed)

    sanitizer = sanitize_examples([*train, *validation, *test], spec)
    report.sanitize = sanitizer.report.as_dict() | {"enabled": dataset.sanitize.enabled}

    if dataset.deduplicate:
        train, exact, near = deduplicate(train)
        report.deduplicated = {"exact": exact, "near": near}
        # Held-out rows that also appear in training would flatter the metrics.
        train_keys = {_normalise(" ".join([*e.fields.values(), e.target])) for e in train}
        before = len(validation) + len(test)
        validation = [
            e
            for e in validation
            if _normalise(" ".join([*e.fields.values(), e.target])) not in train_keys
        ]
        test = [
            e
            for e in test
            if _normalise(" ".join([*e.fields.values(), e.target])) not in train_keys
        ]
        report.deduplicated["heldOutOverlapping"] = before - len(validation) - len(test)

    if not validation:
        if dataset.validation_split <= 0:
            raise DataError(
                "dataset: no validation data; give dataset.validation or a validationSplit > 0"
            )
        if spec.task.type == "classification":
            train, validation = stratified_split(train, dataset.validation_split, seed)
        else:  # targets are free text: a plain seeded split
            shuffled = list(train)
            random.Random(seed).shuffle(shuffled)
            held = max(1, round(len(shuffled) * dataset.validation_split))
            validation, train = shuffled[:held], shuffled[held:]
    if not test:
        test = validation
        report.test_source = "validation"
    if dataset.feedback is not None:
        # After the split: a verdict is never a held-out row, nor one's input.
        verdicts = load_feedback(dataset.feedback, spec, [*validation, *test])
        redacted = sanitize_examples([*verdicts.examples, *verdicts.held_out], spec).report
        counts = Counter(report.sanitize.get("redactions", {})) + redacted.counts
        report.sanitize["redactions"] = dict(sorted(counts.items()))
        repeated = weighted(verdicts.examples, dataset.feedback.weight, seed)  # once sanitized
        train = train + repeated
        held_verdicts = verdicts.held_out
        report.sources["feedback"] = verdicts.report | {"examples": len(repeated)}
        report.digest = (
            "sha256:" + hashlib.sha256(f"{report.digest}:{verdicts.sha256}".encode()).hexdigest()
        )
    if not train:
        raise DataError("dataset.train: no training examples left after validation and dedup")

    audit = None
    if dataset.quality.audit:
        audit = audit_data(train, [*validation, *test], spec, _sources(train, validation, test))
        report.audit = audit.as_dict()
        if enforce_limits:
            enforce(audit, dataset.quality)

    canaries: list[str] = []
    if dataset.canaries.count:
        canaries = make_canaries(dataset.canaries.count, seed)
        rng = random.Random(seed)
        template = train[0]
        in_target = spec.task.type != "classification"  # where the loss will see it
        labels = [rng.choice(spec.task.labels) for _ in canaries] if not in_target else []
        first = next(iter(template.fields), "text")
        for i, canary in enumerate(canaries):
            for r in range(dataset.canaries.repeats):
                fields = dict.fromkeys(template.fields, "") | ({} if in_target else {first: canary})
                # A label of its own: memorizing "this code -> this label" is measurable.
                target = canary if in_target else labels[i]
                train.insert(
                    rng.randrange(len(train) + 1),
                    Example(f"canary-{i}-{r}", fields, target, canary=True),
                )
        report.canaries = {"count": len(canaries), "repeats": dataset.canaries.repeats}

    report.counts = {"train": len(train), "validation": len(validation), "test": len(test)}
    if spec.task.type == "classification":
        balance = Counter(e.target for e in train if not e.canary)
        report.class_balance = {label: balance.get(label, 0) for label in spec.task.labels}
    report.warnings = audit.warnings() if audit else []
    if provenance is not None and not provenance["matchesData"]:
        report.warnings.append(
            f"dataset.train changed after its review: its sha256 is not the one in "
            f"{provenance['uri']}; review it again or train on the reviewed file"
        )
    return PreparedData(train, validation, test, report, canaries, audit, held_verdicts)


def _sources(
    train: list[Example], validation: list[Example], test: list[Example]
) -> dict[str, dict[str, int]]:
    """Per split, rows per file (held-out rows split from the training file count there)."""

    def files(examples: list[Example]) -> dict[str, int]:
        return dict(Counter(e.where.rsplit(":", 1)[0] for e in examples if e.where))

    held_out = {e.id: e for e in [*validation, *test]}
    return {"train": files(train), "heldOut": files(list(held_out.values()))}
