"""The stored result of a job, and how it is published so readers never see half of it.

Layout under the job's prefix (<output.uri>/<job name>/):

    versions/<run id>/adapter/...          safetensors adapter + tokenizer files
    versions/<run id>/report.json          evaluation report (machine)
    versions/<run id>/report.html          evaluation report (people), self-contained
    versions/<run id>/data-report.json     what the data stage saw (counts, redactions)
    versions/<run id>/training-log.jsonl   loss, learning rate, tokens/s per step
    versions/<run id>/manifest.json        lineage + sha256 of every file above; written last
    current.json                           {"version", "manifest", "sha256"}; replaced only after
                                           a complete, verified upload of a new version
    checkpoints/                           resumable training state

A failed or interrupted upload leaves a version without manifest.json, which nothing reads;
current.json keeps pointing at the previous good adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune import storage


class IntegrityError(RuntimeError):
    """A stored file does not match the digest its manifest records."""


@dataclass(frozen=True)
class Published:
    uri: str
    """The version prefix (versions/<run id>)."""
    manifest_sha256: str


def file_digests(stage: Path) -> dict[str, dict[str, Any]]:
    return {
        path.relative_to(stage).as_posix(): {
            "sha256": storage.sha256_file(path),
            "size": path.stat().st_size,
        }
        for path in sorted(stage.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def publish(
    stage: Path,
    job_prefix: storage.Location,
    run_id: str,
    manifest: dict[str, Any],
    make_current: bool = True,
) -> Published:
    """Upload a staged run: every file, then manifest.json (with their digests), then, if
    `make_current` (gates passed), the current.json pointer. Raises StorageError before the
    pointer moves if anything fails."""
    manifest = {**manifest, "files": file_digests(stage)}
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (stage / "manifest.json").write_bytes(body)
    version = job_prefix.join("versions", run_id)
    for name in manifest["files"]:
        storage.write_bytes(version.join(name), (stage / name).read_bytes())
    storage.write_bytes(version.join("manifest.json"), body)
    digest = storage.sha256_file(stage / "manifest.json")
    if make_current:
        pointer = {
            "version": run_id,
            "manifest": f"versions/{run_id}/manifest.json",
            "sha256": digest,
        }
        storage.write_bytes(job_prefix.join("current.json"), json.dumps(pointer, indent=2).encode())
    return Published(version.uri, digest)


def current(job_prefix: str | storage.Location) -> dict[str, Any] | None:
    """The pointer to the job's published version, or None if nothing was published."""
    loc = storage.parse_uri(job_prefix) if isinstance(job_prefix, str) else job_prefix
    pointer = loc.join("current.json")
    if not storage.exists(pointer):
        return None
    return dict(json.loads(storage.read_bytes(pointer)))


def verify(version_uri: str, expected_manifest_sha256: str | None = None) -> dict[str, Any]:
    """Read a version's manifest and check every file's digest (and the manifest's own).
    Returns the manifest; raises IntegrityError naming the first mismatch."""
    import hashlib

    version = storage.parse_uri(version_uri)
    body = storage.read_bytes(version.join("manifest.json"))
    actual = hashlib.sha256(body).hexdigest()
    if expected_manifest_sha256 and actual != expected_manifest_sha256:
        raise IntegrityError(
            f"{version_uri}/manifest.json: sha256 {actual} != expected {expected_manifest_sha256}"
        )
    manifest = json.loads(body)
    for name, info in manifest["files"].items():
        data = storage.read_bytes(version.join(name))
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise IntegrityError(
                f"{version_uri}/{name}: content does not match its recorded sha256"
            )
    return dict(manifest)


def resolve_version(uri: str, sha256: str | None) -> tuple[str, str]:
    """A version URI and the manifest digest to verify it against.

    `uri` is a version (…/versions/<run>, which then needs `sha256`) or a job prefix, whose
    current.json names the version and its digest (and exists only if the job's gates passed).
    """
    uri = uri.rstrip("/")
    if storage.exists(f"{uri}/manifest.json"):
        if sha256 is None:
            raise IntegrityError(
                f"{uri}: a version URI needs the sha256 of its manifest.json; give it, "
                "or give the job prefix to follow its current.json"
            )
        return uri, sha256
    pointer = current(uri)
    if pointer is None:
        raise IntegrityError(
            f"{uri}: neither a published version (no manifest.json) nor a job with a "
            "passing version (no current.json)"
        )
    if sha256 is not None and sha256 != pointer["sha256"]:
        raise IntegrityError(
            f"{uri}: current.json points at a manifest with sha256 {pointer['sha256']}, "
            f"not the expected {sha256}"
        )
    return f"{uri}/versions/{pointer['version']}", str(pointer["sha256"])


def fetch_verified(
    version_uri: str, expected_manifest_sha256: str, dest: Path, include: tuple[str, ...]
) -> dict[str, Any]:
    """Download the manifest and the files under `include` (prefixes such as "adapter/") into
    `dest`, checking each against its recorded digest. Returns the manifest; raises
    IntegrityError naming the first mismatch, leaving nothing in `dest` it could be mistaken for.
    """
    import hashlib
    import shutil

    version = storage.parse_uri(version_uri)
    body = storage.read_bytes(version.join("manifest.json"))
    actual = hashlib.sha256(body).hexdigest()
    if actual != expected_manifest_sha256:
        raise IntegrityError(
            f"{version_uri}/manifest.json: sha256 {actual} != expected {expected_manifest_sha256}"
        )
    manifest = json.loads(body)
    try:
        for name, info in manifest["files"].items():
            if not name.startswith(include):
                continue
            data = storage.read_bytes(version.join(name))
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise IntegrityError(
                    f"{version_uri}/{name}: content does not match its recorded sha256"
                )
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    (dest / "manifest.json").write_bytes(body)
    return dict(manifest)
