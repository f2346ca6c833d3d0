"""Tiny FineTuneJobs for the end-to-end tier, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

WORDS = {
    "benign": ["backup", "completed", "scheduled", "update", "healthy", "routine"],
    "malicious": ["mimikatz", "lsass", "dump", "beacon", "exfil", "ransom"],
}


def write_dataset(path: Path, rows: int, seed: int = 0) -> Path:
    """Two classes told apart by their words; users and addresses for the sanitizer to redact."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        label = ["benign", "malicious"][i % 2]
        words = " ".join(rng.choices(WORDS[label], k=4))
        user, ip = (
            rng.choice(["alice", "bob", "carol"]),
            f"10.0.{rng.randint(0, 9)}.{rng.randint(1, 250)}",
        )
        lines.append(
            json.dumps(
                {
                    "id": f"{path.stem}-{i}",
                    "text": f"{words} by user={user} from {ip} #{i}",
                    "label": label,
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


LOGIN_SCHEMA = {
    "type": "object",
    "required": ["event"],
    "properties": {"event": {"type": "string"}, "port": {"type": "integer"}},
}
"""The JSON the extraction examples of `write_login_lines` parse a line into."""


def write_login_lines(path: Path, rows: int) -> Path:
    """Extraction examples: an sshd line (`text`) and its JSON (`fields`, per LOGIN_SCHEMA)."""
    lines = [
        json.dumps(
            {
                "id": f"x{i}",
                "text": f"Accepted password for user{i % 3} from 10.0.0.{i} port {1000 + i}",
                "fields": json.dumps({"event": "ssh_login_accepted", "port": 1000 + i}),
            }
        )
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_job(name: str, model_dir: Path, train: Path, **spec_overrides: Any) -> dict[str, Any]:
    """A FineTuneJob document training the tiny model on `train` in seconds. Each override
    replaces a spec field, or (a dict) is merged into it."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": f"file://{model_dir}"},
        "dataset": {"train": f"file://{train}", "validationSplit": 0.25},
        "task": {
            "type": "classification",
            "labels": ["benign", "malicious"],
            "systemPrompt": "Rate it.",
        },
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {
            "learningRate": 0.01,
            "epochs": 2,
            "batchSize": 4,
            "gradientAccumulation": 1,
            "maxSeqLength": 96,
        },
        "resources": {"gpus": 0},
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def sectune(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """Run the sectune CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "sectune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
