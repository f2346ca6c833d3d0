"""Tiny adapters trained for real into the S3 server, shared by the serving e2e tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune import artifacts
from sectune.yamlio import dump_yaml

from .jobs import sectune, tiny_job, write_dataset


@dataclass(frozen=True)
class Version:
    uri: str
    sha256: str


@dataclass(frozen=True)
class Trained:
    bucket: str
    prefix: str
    env: dict[str, str]
    triage_v1: Version
    triage_v2: Version
    other: Version
    held_out: Path


def train_version(
    workdir: Path,
    model_dir: Path,
    name: str,
    seed: int,
    env: dict[str, str],
    prefix: str,
    method: dict[str, Any] | None = None,
) -> Version:
    train = write_dataset(workdir / f"{name}-{seed}.jsonl", 48, seed=seed)
    document = tiny_job(
        name,
        model_dir,
        train,
        hyperparameters={"seed": seed},
        evaluation={"probeExamples": 4},
        output={"uri": prefix},
        method=method or {},
    )
    manifest = workdir / f"{name}-{seed}.yaml"
    manifest.write_text(dump_yaml(document))
    result = sectune("run", str(manifest), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Serve:   sectune serve --adapter {name}={prefix}/{name}\n" in result.stderr
    pointer = artifacts.current(f"{prefix}/{name}")
    assert pointer is not None
    return Version(f"{prefix}/{name}/versions/{pointer['version']}", pointer["sha256"])


def train_adapters(  # type: ignore[no-untyped-def]
    s3_server, model_dir: Path, workdir: Path, method: dict[str, Any] | None = None
) -> Trained:
    """Two versions of a triage adapter and one other adapter, all on the given base model
    (`method` overrides the tiny job's LoRA settings)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bucket = "serving-e2e"
    s3_server.client().create_bucket(Bucket=bucket)
    env = s3_server.env()
    prefix = f"s3://{bucket}/adapters"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the store too (current.json)
    try:
        v1 = train_version(workdir, model_dir, "triage", 1, env, prefix, method)
        v2 = train_version(workdir, model_dir, "triage", 2, env, prefix, method)
        other = train_version(workdir, model_dir, "other", 3, env, prefix, method)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    held_out = write_dataset(workdir / "held-out.jsonl", 24, seed=9)
    return Trained(bucket, prefix, env, v1, v2, other, held_out)
