"""Expert review of what the data audit flagged, as a round trip:

    sectune data audit MANIFEST      -> review.csv / review.jsonl: one line per flagged training
                                        row (finding, given and suggested label, sanitized text)
    analysts fill `decision`         -> keep | relabel (with newLabel) | drop
    sectune data review apply        -> a new dataset version, and beside it
                                        `<file>.provenance.json`: who, when, which rows, what
                                        changed, the digests of the source, review and result

The next job that trains on the new file finds the record beside it and its lineage manifest
references it (`prepare_data`). A review file with a bad line is refused whole, naming the
line; the new version is written before its record, each all at once.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from sectune import storage
from sectune.data.audit import TEXT_SHOWN, DataAudit, input_text
from sectune.data.example import Example
from sectune.data.load import DataError, data_digest, read_rows, row_id

COLUMNS = (
    "row",
    "where",
    "finding",
    "label",
    "suggested",
    "confidence",
    "similarTo",
    "text",
    "decision",
    "newLabel",
    "comment",
)
DECISIONS = ("keep", "relabel", "drop")
PROVENANCE_SUFFIX = ".provenance.json"
REVIEW_KIND = "DatasetReview"


# --------------------------------------------------------------------------- the review file


def review_rows(result: DataAudit, examples: dict[str, Example]) -> list[dict[str, str]]:
    """One line per flagged training row, with every finding on it (`finding` joins them:
    leakage, conflict, label-error, near-duplicate), the suggested label of a suspected label
    error, and the row it nearly duplicates. Text is the sanitized input, cut to TEXT_SHOWN
    characters."""
    lines: dict[str, dict[str, str]] = {}

    def add(row: str, finding: str, **extra: str) -> None:
        example = examples.get(row)
        if example is None:
            return
        line = lines.setdefault(
            row,
            dict.fromkeys(COLUMNS, "")
            | {
                "row": row,
                "where": example.where,
                "label": example.target if len(example.target) <= 128 else "",
                "text": input_text(example)[:TEXT_SHOWN],
            },
        )
        line["finding"] = f"{line['finding']}; {finding}" if line["finding"] else finding
        for key, value in extra.items():
            line[key] = line[key] or value

    for pair in result.leaked:  # the training copy of a held-out row
        add(pair.other, "leakage", similarTo=pair.id, confidence=f"{pair.similarity:.3f}")
    for pair in result.conflicts:
        add(pair.id, "conflict", similarTo=pair.other, confidence=f"{pair.similarity:.3f}")
    for issue in result.label_errors:
        add(
            issue.id, "label-error", suggested=issue.suggested, confidence=f"{issue.confidence:.3f}"
        )
    for pair in result.near_duplicates:
        add(pair.id, "near-duplicate", similarTo=pair.other, confidence=f"{pair.similarity:.3f}")
    return list(lines.values())


def write_review(lines: list[dict[str, str]], directory: Path) -> tuple[Path, Path]:
    """review.csv and review.jsonl in `directory`, each written all at once."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    csv_path, jsonl_path = directory / "review.csv", directory / "review.jsonl"
    storage.replace_file(csv_path, buffer.getvalue().encode())
    storage.replace_file(
        jsonl_path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    )
    return csv_path, jsonl_path


# --------------------------------------------------------------------------- applying it


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Change(_Model):
    row: str
    where: str
    decision: Literal["relabel", "drop"]
    old_label: str | None = None
    new_label: str | None = None
    comment: str = ""


class FileDigest(_Model):
    uri: str
    sha256: str
    rows: int | None = None


class DatasetReview(_Model):
    """The provenance record of a reviewed dataset version (`<file>.provenance.json`)."""

    api_version: str = "sectune.io/v1alpha1"
    kind: str = REVIEW_KIND
    reviewer: str
    reviewed_at: str
    source: FileDigest
    review: FileDigest
    result: FileDigest
    counts: dict[str, int] = Field(default_factory=dict)
    """keep, relabel, drop, and unreviewed (flagged lines left without a decision)."""
    changes: list[Change] = Field(default_factory=list)


def read_review(path: Path) -> list[tuple[str, dict[str, str]]]:
    """(where, line) for every line of a review file (CSV or JSONL)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the review file: {exc}") from None
    lines: list[tuple[str, dict[str, str]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"row", "decision"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(
                f"{path}:1: the header lacks {', '.join(sorted(missing))}; keep the columns "
                "`sectune data audit` wrote"
            )
        for record in reader:
            lines.append((f"{path}:{reader.line_num}", {k: v or "" for k, v in record.items()}))
        return lines
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        lines.append(
            (f"{path}:{number}", {k: "" if v is None else str(v) for k, v in record.items()})
        )
    return lines


def _decisions(
    lines: list[tuple[str, dict[str, str]]], known: dict[str, str], labels: list[str]
) -> tuple[dict[str, tuple[str, dict[str, str]]], int]:
    """Each reviewed row's decision and its line; the count of lines left undecided. Every
    bad line is named; any of them refuses the whole file."""
    problems: list[str] = []
    decided: dict[str, tuple[str, dict[str, str]]] = {}
    undecided = 0
    for where, line in lines:
        row, decision = line.get("row", "").strip(), line.get("decision", "").strip().lower()
        if not row:
            problems.append(f"{where}: `row` is empty; keep the row id the audit wrote")
            continue
        if row not in known:
            problems.append(f"{where}: row {row!r} is not in the data file")
            continue
        if not decision:
            undecided += 1
            continue
        if decision not in DECISIONS:
            problems.append(
                f"{where}: decision {line.get('decision', '')!r} is not one of "
                f"{', '.join(DECISIONS)}"
            )
            continue
        new_label = line.get("newLabel", "").strip()
        if decision == "relabel" and not new_label:
            problems.append(f"{where}: decision relabel needs newLabel")
            continue
        if decision == "relabel" and labels and new_label not in labels:
            problems.append(
                f"{where}: newLabel {new_label!r} is not one of the task's labels "
                f"({', '.join(labels)})"
            )
            continue
        if row in decided:
            problems.append(f"{where}: row {row!r} was already decided at {decided[row][0]}")
            continue
        decided[row] = (where, line | {"decision": decision, "newLabel": new_label})
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"the review file has {len(problems)} bad line(s); nothing was written:\n  "
            f"{shown}{more}"
        )
    return decided, undecided


def apply_review(
    data_uri: str,
    review_path: Path,
    out_uri: str,
    reviewer: str,
    id_field: str = "id",
    label_field: str = "label",
    labels: list[str] | None = None,
) -> DatasetReview:
    """Write the reviewed dataset (JSONL) to `out_uri` and its provenance record beside it."""
    if not reviewer.strip():
        raise DataError("--reviewer: name who reviewed the rows (it goes in the record)")
    if out_uri == data_uri:
        raise DataError("--out: write the reviewed version to a new file, not over its source")
    if not out_uri.rsplit("/", 1)[-1].lower().endswith(".jsonl"):
        raise DataError(f"--out {out_uri}: the reviewed version is written as .jsonl")
    rows, parse_problems = read_rows(data_uri)
    if parse_problems:
        where, problem = parse_problems[0]
        raise DataError(f"{where}: {problem}; fix the data file first")
    known = {row_id(r.values, id_field): r.where for r in rows}
    review_lines = read_review(review_path)
    decided, undecided = _decisions(review_lines, known, labels or [])

    kept: list[str] = []
    changes: list[Change] = []
    counts: Counter[str] = Counter()
    for raw in rows:
        rid = row_id(raw.values, id_field)
        values = dict(raw.values)
        if rid in decided:
            _, line = decided[rid]
            decision = line["decision"]
            counts[decision] += 1
            old = values.get(label_field)
            change = Change(
                row=rid,
                where=raw.where,
                decision="drop" if decision == "drop" else "relabel",
                old_label=old if isinstance(old, str) and len(old) <= 128 else None,
                comment=line.get("comment", "")[:1000],
            )
            if decision == "drop":
                changes.append(change)
                continue
            if decision == "relabel" and line["newLabel"] != old:
                values[label_field] = change.new_label = line["newLabel"]
                if id_field not in values:
                    # The content-derived id would change with the label: keep the old one.
                    values[id_field] = rid
                changes.append(change)
        kept.append(json.dumps(values, ensure_ascii=False, default=str))
    counts["unreviewed"] = undecided
    body = ("\n".join(kept) + "\n").encode()
    record = DatasetReview(
        reviewer=reviewer.strip()[:256],
        reviewed_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=FileDigest(uri=data_uri, sha256=data_digest(data_uri), rows=len(rows)),
        review=FileDigest(
            uri=str(review_path),
            sha256=hashlib.sha256(review_path.read_bytes()).hexdigest(),
            rows=len(review_lines),
        ),
        result=FileDigest(uri=out_uri, sha256=hashlib.sha256(body).hexdigest(), rows=len(kept)),
        counts=dict(counts),
        changes=changes,
    )
    # The version first, its record last: a record always describes a complete file.
    storage.write_bytes(out_uri, body)
    storage.write_bytes(
        out_uri + PROVENANCE_SUFFIX,
        json.dumps(record.model_dump(mode="json", by_alias=True), indent=2).encode(),
    )
    return record


def provenance_for(data_uri: str) -> dict[str, Any] | None:
    """The review record stored beside a data file, summarised for the lineage manifest, with
    whether the file is still the one reviewed (its digest matches); None when there is none."""
    record_uri = data_uri + PROVENANCE_SUFFIX
    if not storage.exists(record_uri):
        return None
    raw = storage.read_bytes(record_uri)
    try:
        record = DatasetReview.model_validate_json(raw)
    except ValueError as exc:
        raise DataError(
            f"{record_uri}: not a review record ({str(exc).splitlines()[0]}); remove it or "
            "write it again with `sectune data review apply`"
        ) from None
    return {
        "uri": record_uri,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "reviewer": record.reviewer,
        "reviewedAt": record.reviewed_at,
        "source": record.source.model_dump(by_alias=True),
        "counts": record.counts,
        "matchesData": record.result.sha256 == data_digest(data_uri),
    }
