"""`sectune fetch-adapters`: put every version of a ServingConfig on disk, verified, for a server
that cannot fetch and verify by itself (vLLM's init container, runtime: vllm).

The same checks as `sectune serve` makes before loading (sectune.serving.verify): every file
against the manifest's digests and the manifest against its pinned sha256, gates passed (unless
the config says otherwise), trained on the base model that is served, an adapter, safetensors
only. Any failure fails the whole
command, so a vLLM pod never starts with a set it could not verify and the Deployment's previous
pods keep serving.

    <out>/base                        -> the resolved base model directory
    <out>/<adapter>/<version>/adapter  the adapter files
    <out>/vllm.yaml                    `max-lora-rank`: the smallest rank vLLM offers that holds
                                       every adapter's (vLLM pre-allocates for it; read with
                                       `vllm serve --config`)
    <out>/verified.json                every version's verified manifest digest and directory,
                                       written last (read by `sectune route-vllm`)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sectune import artifacts, storage
from sectune.config import JobSpec, ManifestError
from sectune.serving import verify
from sectune.serving.config import VLLM_ARGS, ServingConfig

VERIFIED = "verified.json"


@dataclass(frozen=True)
class Verified:
    """One version as the init container verified it."""

    adapter: str
    version: str
    sha256: str
    """Of the version's manifest.json."""
    path: str
    """The adapter directory vLLM is started with (`--lora-modules name@version=<path>`)."""


def read_verified(out: Path) -> list[Verified]:
    """What `fetch_adapters` verified into `out`."""
    try:
        rows = json.loads((out / VERIFIED).read_text())
        return [Verified(**row) for row in rows]
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(
            f"{out / VERIFIED}: not written by sectune fetch-adapters ({exc}); the init "
            "container must run first"
        ) from None


VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""


def vllm_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM offers that holds every adapter's."""
    largest = max(ranks, default=1)
    fits = [rank for rank in VLLM_RANKS if rank >= largest]
    if not fits:
        raise verify.LoadError(
            "invalid", f"an adapter of rank {largest}: vLLM serves LoRA ranks up to 512"
        )
    return fits[0]


def fetch_adapters(
    config: ServingConfig, out: Path, max_bytes: int = artifacts.MAX_ARTIFACT_BYTES
) -> list[str]:
    """Fetch and verify every version; returns what was done, a line each."""
    from sectune.training import base_model

    if config.base_model is None:
        raise ManifestError("baseModel: a server fed by fetch-adapters needs its base model set")
    out.mkdir(parents=True, exist_ok=True)
    resolved = base_model.resolve(config.base_model)
    fetched, ranks, verified = [], [], []
    for adapter in config.adapters:
        for entry in adapter.versions:
            label = f"{adapter.name}@{entry.version}"
            where = f"{adapter.name}/{entry.version}"
            directory = storage.contained(out, where, f"adapter {label}")
            shutil.rmtree(directory, ignore_errors=True)
            version_uri, sha256 = verify.resolve(entry.uri, entry.sha256)
            manifest = verify.fetch(
                version_uri,
                sha256,
                directory,
                include=("adapter/",),
                max_bytes=max_bytes,
                passed_gates=config.require_passed_gates,
                base_digest=resolved.digest,
            )
            ranks.append(JobSpec.model_validate(manifest.config).method.r)
            verified.append(
                Verified(adapter.name, entry.version, sha256, str(directory / "adapter"))
            )
            fetched.append(f"verified {label} {sha256}")
    base = out / "base"
    if base.is_symlink() or base.exists():
        base.unlink()
    base.symlink_to(resolved.path, target_is_directory=True)
    rank = vllm_rank(ranks)
    storage.replace_file(out / VLLM_ARGS, f"max-lora-rank: {rank}\n".encode())
    rows = [asdict(v) for v in verified]
    storage.replace_file(out / VERIFIED, json.dumps(rows, indent=1).encode())
    return [*fetched, f"max-lora-rank {rank} (adapter ranks {sorted(set(ranks))})"]
