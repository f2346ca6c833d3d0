"""What is checked before a stored version is used, written once: by the server before it loads
a version (`sectune serve`), by `sectune fetch-adapters` before vLLM may (runtime: vllm), and by
`sectune evaluate` before it scores one.

1. The version resolves (a job prefix follows its current.json) and every file fetched is
   checked against the manifest's digests, the manifest against its pinned sha256.
2. Its gates passed, unless the caller serves failed versions on purpose.
3. It was trained on the base model that is served.
4. It is an adapter, when an adapter is what is served.
5. Its weights are safetensors only (pickle files are never loaded).

A refusal is a LoadError whose `reason` is the label the server's metrics and the operator's
status show: storage, integrity, gates-failed, base-model, invalid, unsafe-format.
"""

from __future__ import annotations

from pathlib import Path

from sectune import artifacts, storage
from sectune.contract import AdapterManifest


class LoadError(RuntimeError):
    """A version that cannot be used; `reason` is the metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def resolve(uri: str, sha256: str | None) -> tuple[str, str]:
    """The version URI and manifest digest a ServingConfig entry names (step 1)."""
    try:
        return artifacts.resolve_version(uri, sha256)
    except artifacts.IntegrityError as exc:
        raise LoadError("integrity", str(exc)) from None
    except storage.StorageError as exc:
        raise LoadError("storage", str(exc)) from None


def fetch(
    version_uri: str,
    sha256: str,
    directory: Path,
    *,
    include: tuple[str, ...],
    max_bytes: int,
    passed_gates: bool,
    base_digest: str | None,
) -> AdapterManifest:
    """Fetch a resolved adapter version into `directory` and check it (steps 1-5)."""
    try:
        manifest = artifacts.fetch_verified(
            version_uri, sha256, directory, include=include, max_bytes=max_bytes
        )
    except artifacts.IntegrityError as exc:
        raise LoadError("integrity", str(exc)) from None
    except storage.StorageError as exc:
        raise LoadError("storage", str(exc)) from None
    check(
        manifest,
        directory,
        version_uri,
        passed_gates=passed_gates,
        base_digest=base_digest,
        adapter_only=True,
    )
    return manifest


def check(
    manifest: AdapterManifest,
    directory: Path,
    version_uri: str,
    *,
    passed_gates: bool,
    base_digest: str | None,
    adapter_only: bool,
) -> None:
    """Steps 2-5 on a version fetched (and digest-checked) into `directory`."""
    if passed_gates:
        require_passed_gates(manifest, version_uri)
    trained_on = manifest.base_model.sha256
    if base_digest is not None and trained_on != base_digest:
        raise LoadError(
            "base-model",
            f"{version_uri} was trained on base model sha256 {trained_on}, not {base_digest}: "
            "a version is used only with the base model it was trained on",
        )
    weights = directory / "adapter"
    if adapter_only and not (weights / "adapter_config.json").exists():
        raise LoadError(
            "invalid",
            f"{version_uri} holds a whole model (method {manifest.method}), not an adapter; "
            "serve it as a base model of its own",
        )
    try:
        artifacts.require_safetensors(weights, version_uri)
    except artifacts.IntegrityError as exc:
        raise LoadError("unsafe-format", str(exc)) from None


def require_passed_gates(manifest: AdapterManifest, version_uri: str) -> None:
    """A version whose evaluation failed its gates is not served (promotion.requirePassedGates)."""
    if manifest.gates_passed is not False:
        return
    failing = manifest.failing_gates()
    raise LoadError(
        "gates-failed",
        f"{version_uri} failed its evaluation gates ({', '.join(failing) or 'see report.json'}); "
        "it is not served. Retrain it, or set requirePassedGates: false to compare it by hand.",
    )
