"""Read rows from JSONL, CSV and Parquet files on file:// or s3://, keeping line numbers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

from sectune import storage

MAX_DATA_BYTES = int(os.environ.get("SECTUNE_MAX_DATA_BYTES", str(4 << 30)))
"""Largest data file read (it is held in memory while rows are parsed)."""


class DataError(ValueError):
    """Bad input data. The message names the file, the line, the field and what to do; it
    never repeats the text of an example (it may hold secrets or personal data)."""


@dataclass(frozen=True)
class RawRow:
    source: str
    line: int
    values: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def row_id(values: dict[str, Any], id_field: str) -> str:
    """A row's id: its id field, or a digest of its content when it has none (so the same
    row has the same id in every run, review file and report)."""
    raw_id = values.get(id_field)
    if raw_id is None or raw_id == "":
        digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
        return "sha256:" + digest.hexdigest()[:16]
    return str(raw_id)


def data_digest(*uris: str | None) -> str:
    """sha256 over the bytes of the given data files, in order (absent ones skipped)."""
    digest = hashlib.sha256()
    for uri in uris:
        if uri:
            for chunk in storage.stream(uri, MAX_DATA_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _describe(value: Any) -> str:
    """Say what a bad value is without echoing it."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return f"a {type(value).__name__}"


def read_rows(uri: str) -> tuple[list[RawRow], list[tuple[str, str]]]:
    """All rows of one data file, and (location, problem) for lines that do not parse."""
    try:
        data = storage.read_bytes(uri, MAX_DATA_BYTES)
    except storage.TooLarge:
        raise DataError(
            f"{uri}: larger than {MAX_DATA_BYTES:,} bytes; split it into several files or "
            "raise SECTUNE_MAX_DATA_BYTES"
        ) from None
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".parquet"):
        return _read_parquet(uri, data), []
    if name.endswith(".csv"):
        return _read_csv(uri, data)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return _read_jsonl(uri, data)
    raise DataError(f"{uri}: unknown data format; use .jsonl, .csv or .parquet")


def _read_jsonl(uri: str, data: bytes) -> tuple[list[RawRow], list[tuple[str, str]]]:
    rows, problems = [], []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(
                (f"{uri}:{number}", f"malformed JSON ({exc.msg} at column {exc.colno})")
            )
            continue
        if not isinstance(value, dict):
            problems.append((f"{uri}:{number}", f"expected a JSON object, got {_describe(value)}"))
            continue
        rows.append(RawRow(uri, number, value))
    return rows, problems


def _read_csv(uri: str, data: bytes) -> tuple[list[RawRow], list[tuple[str, str]]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8", errors="replace")))
    rows, problems = [], []
    for record in reader:
        line = reader.line_num
        if None in record:
            problems.append((f"{uri}:{line}", "more columns than the header names"))
            continue
        rows.append(RawRow(uri, line, dict(record)))
    return rows, problems


def _read_parquet(uri: str, data: bytes) -> list[RawRow]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    # Parquet has no lines; the row number (1-based) stands in for one.
    return [RawRow(uri, i, row) for i, row in enumerate(table.to_pylist(), 1)]
