"""The data audit: what a careful analyst would find in a training set before compute is spent.

    suspected label errors   confident learning (cleanlab) on out-of-fold probabilities of a
                             TF-IDF + logistic-regression classifier (classification)
    near-duplicates          candidates from MinHash/LSH (datasketch) over character 5-grams,
                             confirmed by edit similarity; conflicting labels on near-identical
                             inputs
    leakage                  held-out rows that nearly duplicate a training row
    coverage                 per-label counts against minimums, lengths train vs held-out,
                             rows cut by maxSeqLength (once a tokenizer is loaded)

Every job runs it on the sanitized rows it will train on (`prepare_data`), and
`sectune data audit` runs it from the command line; `check_limits` turns `dataset.quality`
limits into a failure before training. Rows are named by id and file:line, and the review
file (`sectune.data.review`) shows the sanitized text, never the raw.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from difflib import SequenceMatcher
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sectune.config import JobSpec, QualitySpec
from sectune.contract import DataQuality
from sectune.data.example import Example
from sectune.data.load import DataError

SHINGLE = 5
"""Character n-gram size of the near-duplicate measure: an edited word changes few of them."""
PERMUTATIONS = 128
CANDIDATE_JACCARD = 0.3
"""LSH candidates: rows whose character 5-grams overlap this much (Jaccard) are compared; one
edited word in a short row still overlaps more."""
LONG_ROW = 200
LONG_ROW_JACCARD = 0.5
"""Rows of LONG_ROW characters or more are compared exactly only when their estimated
Jaccard reaches this: an edit barely moves a long row's n-grams, and an exact comparison of
two 2,000-character Sigma rules is slow."""
SHORT_WORDS = 12
"""Rows of up to this many words are also indexed by their words (see `_edit_keys`)."""
MIN_CONTAINED = 20
"""A row of at least this many characters found whole inside another is its near-duplicate."""
FOLDS = 5
MIN_ROWS_FOR_LABEL_ERRORS = 20
LISTED = 1000
"""Flagged rows listed in the report (counts are always complete)."""
TEXT_SHOWN = 300
"""Characters of a flagged row's sanitized input kept in the report and the review file."""
SHOWN = 10
"""Labels named in a message or in status (it must fit a 4 KiB termination message)."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class LabelIssue(_Model):
    """A training row whose label the out-of-fold classifier confidently disagrees with."""

    id: str
    given: str
    suggested: str
    confidence: float
    """The classifier's out-of-fold probability of the suggested label."""
    label_quality: float
    """Its probability of the given label (lower is more suspect)."""
    where: str = ""
    """file:line of the row."""
    text: str = ""
    """The row's input as sanitized, cut to TEXT_SHOWN characters (the report is stored with
    the adapter, in the tenant's storage; it never goes to status, Events or logs)."""


class NearPair(_Model):
    """Two rows whose inputs nearly match: `id` is the later (or held-out) one."""

    id: str
    other: str
    similarity: float
    """Edit similarity of the normalised inputs (see `similarity`; a pair found by
    `near_duplicate`'s word or containment rule can be under the threshold)."""
    labels: tuple[str, str] | None = None
    """The two labels, when they differ (a conflict)."""


class LengthSummary(_Model):
    rows: int
    p10: int
    median: int
    p90: int
    max: int


class Truncation(_Model):
    """Rows longer than maxSeqLength: training cuts the middle of their prompt."""

    max_seq_length: int
    rows_cut: int
    share_cut: float
    """Rows cut / training rows."""
    median_share_lost: float
    """Of the rows cut, the median share of prompt tokens the model never sees."""
    max_share_lost: float
    by_label: dict[str, int] = Field(default_factory=dict)
    """Rows cut per label (classification)."""


class Coverage(_Model):
    labels: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Per label: training and held-out rows (classification)."""
    labels_under_minimum: list[str] = Field(default_factory=list)
    train_under_minimum: bool = False
    min_examples_per_label: int = 0
    min_train_examples: int = 0
    length: dict[str, LengthSummary] = Field(default_factory=dict)
    """Input length in characters, training against held-out."""
    length_shift: float | None = None
    """Two-sample Kolmogorov-Smirnov statistic of the lengths, training against held-out
    (0: the same distribution, 1: disjoint)."""
    sources: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Per split, rows per source file."""
    truncation: Truncation | None = None


class DataAudit(_Model):
    """The audit's findings; `summary()` is what status, the result and the manifest carry."""

    method: str = ""
    """How label errors were looked for, or why not."""
    train_rows: int = 0
    held_out_rows: int = 0
    label_errors: list[LabelIssue] = Field(default_factory=list)
    label_errors_total: int | None = None
    near_duplicates: list[NearPair] = Field(default_factory=list)
    near_duplicates_total: int = 0
    conflicts: list[NearPair] = Field(default_factory=list)
    conflicts_total: int = 0
    leaked: list[NearPair] = Field(default_factory=list)
    leaked_total: int = 0
    coverage: Coverage = Field(default_factory=Coverage)
    broken_limits: list[str] = Field(default_factory=list)

    def summary(self) -> DataQuality:
        return DataQuality(
            train_rows=self.train_rows,
            held_out_rows=self.held_out_rows,
            suspected_label_errors=self.label_errors_total,
            near_duplicates=self.near_duplicates_total,
            conflicting=self.conflicts_total,
            leaked_held_out=self.leaked_total,
            labels_under_minimum=self.coverage.labels_under_minimum[:SHOWN],
            broken_limits=self.broken_limits,
        )

    def leaked_ids(self) -> set[str]:
        return {pair.id for pair in self.leaked}

    def warnings(self) -> list[str]:
        notes = []
        cov = self.coverage
        if cov.train_under_minimum:
            notes.append(
                f"{self.train_rows} training examples (under {cov.min_train_examples}): "
                "a model will likely overfit"
            )
        for label in cov.labels_under_minimum:
            n = cov.labels.get(label, {}).get("train", 0)
            notes.append(
                f"label {label!r} has {n} training examples (under "
                f"{cov.min_examples_per_label}); its per-class metrics will be noisy"
            )
        if self.leaked_total:
            notes.append(
                f"{self.leaked_total} of {self.held_out_rows} held-out rows nearly duplicate a "
                "training row: held-out metrics are also reported without them"
            )
        if self.label_errors_total:
            notes.append(
                f"{self.label_errors_total} training rows are suspected label errors: "
                "review them with `sectune data audit`"
            )
        return notes

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class DataQualityError(DataError):
    """The data broke a dataset.quality limit: retrying cannot help; fix the data."""

    def __init__(self, message: str, audit: DataAudit) -> None:
        super().__init__(message)
        self.audit = audit


# --------------------------------------------------------------------------- the audit


def audit(
    train: list[Example],
    held_out: list[Example],
    spec: JobSpec,
    sources: dict[str, dict[str, int]] | None = None,
) -> DataAudit:
    """Audit the rows a job will train on and judge with (canaries excluded)."""
    settings = spec.dataset.quality
    train = [e for e in train if not e.canary]
    held_out = _unique(held_out)
    classification = spec.task.type == "classification"
    result = DataAudit(train_rows=len(train), held_out_rows=len(held_out))

    if classification:
        found, result.method = label_errors(train, spec.task.labels, spec.hyperparameters.seed)
        if found is not None:
            result.label_errors_total = len(found)
            result.label_errors = found[:LISTED]

    index = NearDuplicateIndex(settings.near_duplicate_threshold)
    for example in train:
        for other, similarity in index.matches(example):
            pair = NearPair(id=example.id, other=other.id, similarity=similarity)
            if classification and other.target != example.target:
                pair.labels = (example.target, other.target)
                result.conflicts_total += 1
                if len(result.conflicts) < LISTED:
                    result.conflicts.append(pair)
            else:
                result.near_duplicates_total += 1
                if len(result.near_duplicates) < LISTED:
                    result.near_duplicates.append(pair)
            break  # one match names the row; its group is found through the other
        index.add(example)
    for example in held_out:
        for other, similarity in index.matches(example):
            # Every one is listed: the evaluation scores the held-out set without them.
            result.leaked_total += 1
            result.leaked.append(NearPair(id=example.id, other=other.id, similarity=similarity))
            break

    result.coverage = coverage(train, held_out, spec, settings, sources or {})
    return result


def _unique(examples: list[Example]) -> list[Example]:
    """Held-out rows once each (the test set is the validation set when none is given)."""
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.id not in seen:
            seen.add(example.id)
            unique.append(example)
    return unique


def check_limits(result: DataAudit, settings: QualitySpec) -> list[str]:
    """The dataset.quality limits the audit's findings break, each naming the field."""
    broken = []

    def over(field: str, limit: float | None, count: int | None, of: int) -> None:
        if limit is None or count is None or of == 0:
            return
        if count / of > limit:
            broken.append(
                f"dataset.quality.{field}: {count} of {of} rows ({count / of:.3f}) is over {limit}"
            )

    over("maxLabelErrors", settings.max_label_errors, result.label_errors_total, result.train_rows)
    over("maxLeakage", settings.max_leakage, result.leaked_total, result.held_out_rows)
    over("maxConflicting", settings.max_conflicting, result.conflicts_total, result.train_rows)
    if settings.enforce_minimums:
        cov = result.coverage
        if cov.train_under_minimum:
            broken.append(
                f"dataset.quality.minTrainExamples: {result.train_rows} training rows, under "
                f"{cov.min_train_examples}"
            )
        if cov.labels_under_minimum:
            shown = ", ".join(
                f"{label!r} ({cov.labels.get(label, {}).get('train', 0)})"
                for label in cov.labels_under_minimum[:SHOWN]
            )
            if len(cov.labels_under_minimum) > SHOWN:
                shown += f" and {len(cov.labels_under_minimum) - SHOWN} more"
            broken.append(
                f"dataset.quality.minExamplesPerLabel: under {cov.min_examples_per_label} "
                f"training rows: {shown}"
            )
    return broken


def enforce(result: DataAudit, settings: QualitySpec) -> None:
    """Record the broken limits; raise DataQualityError when there are any."""
    result.broken_limits = check_limits(result, settings)
    if result.broken_limits:
        raise DataQualityError(
            "the data breaks dataset.quality limits:\n  "
            + "\n  ".join(result.broken_limits)
            + "\nSee the rows with `sectune data audit MANIFEST` and review them, or raise the "
            "limits.",
            result,
        )


# --------------------------------------------------------------------------- label errors


def input_text(example: Example) -> str:
    """The text a row is judged on: its input fields, or its target for raw text."""
    text = " ".join(v for v in example.fields.values() if v)
    if example.messages:
        text = " ".join(m["content"] for m in example.messages[:-1])
    return text or example.target


def out_of_fold_probabilities(
    texts: list[str], labels: list[int], seed: int, folds: int = FOLDS
) -> Any:
    """Each row's label probabilities from a TF-IDF + logistic-regression model that never
    saw it (stratified k-fold)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    smallest = min(Counter(labels).values())
    splits = max(2, min(folds, smallest))
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(texts) > 200 else 1),
        LogisticRegression(max_iter=2000, C=10.0),
    )
    cv = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    return cross_val_predict(model, texts, labels, cv=cv, method="predict_proba")


def label_errors(
    train: list[Example], labels: list[str], seed: int
) -> tuple[list[LabelIssue] | None, str]:
    """Suspected label errors, most suspect first, and how they were found (or why not)."""
    import warnings

    from cleanlab.filter import find_label_issues

    present = sorted({e.target for e in train}, key=labels.index)
    counts = Counter(e.target for e in train)
    if len(present) < 2 or len(train) < MIN_ROWS_FOR_LABEL_ERRORS:
        return None, (
            f"not measured: {len(train)} training rows and {len(present)} labels (needs "
            f"{MIN_ROWS_FOR_LABEL_ERRORS} rows and 2 labels)"
        )
    # Labels with a single row cannot be cross-validated: they are judged, not judges.
    judged = [label for label in present if counts[label] >= 2]
    rows = [e for e in train if e.target in judged]
    y = [judged.index(e.target) for e in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probabilities = out_of_fold_probabilities([input_text(e) for e in rows], y, seed)
        ranked = find_label_issues(
            y, probabilities, filter_by="both", return_indices_ranked_by="self_confidence"
        )
    found = []
    for i in ranked:
        suggested = int(probabilities[i].argmax())
        found.append(
            LabelIssue(
                id=rows[i].id,
                given=judged[y[i]],
                suggested=judged[suggested],
                confidence=round(float(probabilities[i][suggested]), 4),
                label_quality=round(float(probabilities[i][y[i]]), 4),
                where=rows[i].where,
                text=input_text(rows[i])[:TEXT_SHOWN],
            )
        )
    method = (
        "confident learning (cleanlab, prune by noise rate and confident joint) on "
        f"{min(FOLDS, max(2, min(counts[label] for label in judged)))}-fold out-of-fold "
        "TF-IDF (word 1-2-grams) + logistic-regression probabilities"
    )
    return found, method


# --------------------------------------------------------------------------- near-duplicates


def _normalise(text: str) -> str:
    text = re.sub(r"<([A-Z_]+)_\d+>", r"<\1>", text).lower()
    return re.sub(r"\s+", " ", text).strip()


def shingles(text: str, size: int = SHINGLE) -> set[str]:
    """Character n-grams of the normalised text (the LSH index's view of a row)."""
    text = _normalise(text)
    if len(text) <= size:
        return {text}
    return {text[i : i + size] for i in range(len(text) - size + 1)}


def similarity(a: str, b: str) -> float:
    """Edit similarity of two normalised texts: 2 x matching characters / total characters
    (difflib's ratio). One word changed in a 12-word alert keeps it near 0.9, where the Jaccard
    similarity of its n-grams falls under 0.7."""
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


def near_duplicate(a: str, b: str, threshold: float) -> float | None:
    """The similarity of two normalised texts when they are near-duplicates, else None: at or
    above `threshold`, or, for short rows where one edit weighs more than the threshold
    allows, one word changed, added or removed (of three or more), or one row being the other
    with text added before or after it (of 20 characters or more)."""
    matcher = SequenceMatcher(None, a, b, autojunk=False)
    # The cheap upper bounds first: long rows (a Sigma rule is 2,000 characters) make the
    # exact ratio slow, and most LSH candidates are far below the threshold.
    if matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold:
        score = matcher.ratio()
        if score >= threshold:
            return score
    shorter, longer = sorted((a, b), key=len)
    if len(shorter) >= MIN_CONTAINED and shorter in longer:
        return matcher.ratio()
    words_a, words_b = a.split(), b.split()
    if min(len(words_a), len(words_b)) >= 3 and abs(len(words_a) - len(words_b)) <= 1:
        words = SequenceMatcher(None, words_a, words_b, autojunk=False)
        same = sum(block.size for block in words.get_matching_blocks())
        if max(len(words_a), len(words_b)) - same <= 1:
            return matcher.ratio()
    return None


def _edit_keys(text: str) -> list[tuple[str, ...]]:
    """A short row's words, and its words with each one left out: two rows one word apart
    (changed, added or removed) share one of these keys."""
    words = tuple(text.split())
    if not 3 <= len(words) <= SHORT_WORDS:
        return []
    return [words, *(words[:i] + words[i + 1 :] for i in range(len(words)))]


class NearDuplicateIndex:
    """Rows indexed by MinHash over character 5-grams in an LSH index (datasketch), which
    finds candidates fast, and, for short rows, by their words with one left out (an edit in
    a four-word row leaves too few n-grams in common for LSH); each candidate is confirmed by
    `near_duplicate`, so a reported pair really is one."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.lsh = MinHashLSH(threshold=CANDIDATE_JACCARD, num_perm=PERMUTATIONS)
        self.rows: dict[str, tuple[Example, str, Any]] = {}
        self.short: dict[tuple[str, ...], list[str]] = {}
        self._pending: tuple[str, str, Any] | None = None

    @staticmethod
    def _sketch(text: str) -> Any:
        from datasketch import MinHash

        sketch = MinHash(num_perm=PERMUTATIONS, seed=1)
        sketch.update_batch([g.encode() for g in shingles(text)])
        return sketch

    def matches(self, example: Example) -> list[tuple[Example, float]]:
        """Indexed rows that `example` nearly duplicates, most similar first."""
        text = _normalise(input_text(example))
        sketch = self._sketch(text)
        self._pending = (example.id, text, sketch)
        candidates = set(self.lsh.query(sketch))
        for key in _edit_keys(text):
            candidates.update(self.short.get(key, ()))
        found = []
        for key in candidates:
            other, other_text, other_sketch = self.rows[key]
            long = min(len(text), len(other_text)) >= LONG_ROW
            if long and sketch.jaccard(other_sketch) < LONG_ROW_JACCARD:
                continue
            score = near_duplicate(text, other_text, self.threshold)
            if score is not None:
                found.append((other, round(score, 4)))
        return sorted(found, key=lambda pair: (-pair[1], pair[0].id))

    def add(self, example: Example) -> None:
        """Index the row last passed to `matches`."""
        assert self._pending and self._pending[0] == example.id, "add() follows matches()"
        key, text, sketch = self._pending
        if key not in self.rows:
            self.rows[key] = (example, text, sketch)
            self.lsh.insert(key, sketch)
            for words in _edit_keys(text):
                self.short.setdefault(words, []).append(key)


# --------------------------------------------------------------------------- coverage


def _lengths(examples: list[Example]) -> LengthSummary | None:
    lengths = sorted(len(input_text(e)) for e in examples)
    if not lengths:
        return None

    def at(q: float) -> int:
        return lengths[min(len(lengths) - 1, int(q * len(lengths)))]

    return LengthSummary(
        rows=len(lengths),
        p10=at(0.1),
        median=int(statistics.median(lengths)),
        p90=at(0.9),
        max=lengths[-1],
    )


def coverage(
    train: list[Example],
    held_out: list[Example],
    spec: JobSpec,
    settings: QualitySpec,
    sources: dict[str, dict[str, int]],
) -> Coverage:
    result = Coverage(
        min_examples_per_label=settings.min_examples_per_label,
        min_train_examples=settings.min_train_examples,
        train_under_minimum=len(train) < settings.min_train_examples,
        sources=sources,
    )
    if spec.task.type == "classification":
        in_train = Counter(e.target for e in train)
        in_held = Counter(e.target for e in held_out)
        result.labels = {
            label: {"train": in_train.get(label, 0), "heldOut": in_held.get(label, 0)}
            for label in spec.task.labels
        }
        result.labels_under_minimum = [
            label
            for label in spec.task.labels
            if in_train.get(label, 0) < settings.min_examples_per_label
        ]
    for name, rows in (("train", train), ("heldOut", held_out)):
        summary = _lengths(rows)
        if summary:
            result.length[name] = summary
    if train and held_out:
        from scipy.stats import ks_2samp

        shift = ks_2samp(
            [len(input_text(e)) for e in train], [len(input_text(e)) for e in held_out]
        )
        result.length_shift = round(float(shift.statistic), 4)
    return result


def truncation(
    examples: list[Example],
    prompt_tokens: list[int],
    target_tokens: list[int],
    max_length: int,
    labelled: bool,
) -> Truncation:
    """Rows whose prompt and target do not fit in `max_length` tokens; training keeps the
    prompt's start and end and drops the middle (sectune.data.format.fit_prompt). `labelled`:
    count them per label (classification; a free-text target is row content)."""
    lost, by_label = [], Counter[str]()
    for example, prompt, target in zip(examples, prompt_tokens, target_tokens, strict=True):
        over = prompt + target - max_length
        if over > 0 and prompt:
            lost.append(min(1.0, over / prompt))
            if labelled:
                by_label[example.target] += 1
    return Truncation(
        max_seq_length=max_length,
        rows_cut=len(lost),
        share_cut=round(len(lost) / max(1, len(examples)), 4),
        median_share_lost=round(statistics.median(lost), 4) if lost else 0.0,
        max_share_lost=round(max(lost), 4) if lost else 0.0,
        by_label=dict(by_label),
    )
