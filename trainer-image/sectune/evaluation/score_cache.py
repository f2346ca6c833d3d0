"""Base-model scores kept between runs: re-running a manifest whose base model, held-out rows,
prompt and numerics are unchanged does not score the base model again (zero-shot and
few-shot over a few hundred rows take minutes on a CPU, often longer than training).

The key is a sha256 over everything the scores depend on: the base model's digest, the
numerics, the task and hyperparameter and evaluation settings (prompt, labels, lengths), the
held-out and training rows after sanitization (few-shot demonstrations come from training),
the held-out rows the audit flags as leaked, and the source of the code that scores. A value
holds metrics only (no text of any row). The cache is a folder (`SECTUNE_SCORE_CACHE`,
default `~/.cache/sectune/scores`; `off` disables it); one that cannot be written is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "SECTUNE_SCORE_CACHE"
SCORING_SOURCES = (
    "evaluation/scoring.py",
    "evaluation/prefix.py",
    "evaluation/suite.py",
    "evaluation/metrics.py",
    "evaluation/baselines.py",
    "data/format.py",
)
"""The code the scores come from: a change to it is a new key."""


def folder() -> Path | None:
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() == "off":
        return None
    return Path(setting) if setting else Path.home() / ".cache" / "sectune" / "scores"


def _rows_digest(examples: list[Any]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(
            json.dumps([e.id, e.fields, e.target, e.messages], sort_keys=True).encode() + b"\n"
        )
    return digest.hexdigest()


def key(
    base_digest: str, numerics: str, settings: dict[str, Any], data: Any, which: tuple[str, ...]
) -> str:
    """The cache key of the base model's scores on `data` (a PreparedData)."""
    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    for name in SCORING_SOURCES:
        code.update((package / name).read_bytes())
    material = {
        "base": base_digest,
        "numerics": numerics,
        "settings": settings,
        "which": list(which),
        "test": _rows_digest(data.test),
        "train": _rows_digest(data.train),
        "leaked": sorted(data.leaked_ids()),
        "code": code.hexdigest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def load(cache_key: str) -> dict[str, dict[str, Any]] | None:
    where = folder()
    if where is None:
        return None
    try:
        value = json.loads((where / f"{cache_key}.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def store(cache_key: str, scores: dict[str, dict[str, Any]]) -> None:
    where = folder()
    if where is None:
        return
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        from sectune.storage import replace_file

        replace_file(where / f"{cache_key}.json", json.dumps(scores).encode())
    except OSError as exc:
        log.debug("base-model scores not cached: %s", exc)
