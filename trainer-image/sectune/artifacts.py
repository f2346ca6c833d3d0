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


def read_manifest(version_uri: str, expected_sha256: str | None) -> tuple[bytes, dict[str, Any]]:
    """A version's manifest.json (raw and parsed), checked against `expected_sha256` if given."""
    import hashlib

    body = storage.read_bytes(storage.parse_uri(version_uri).join("manifest.json"))
    actual = hashlib.sha256(body).hexdigest()
    if expected_sha256 and actual != expected_sha256:
        raise IntegrityError(
            f"{version_uri}/manifest.json: sha256 {actual} != expected {expected_sha256}"
        )
    return body, dict(json.loads(body))


def _read_checked(version_uri: str, name: str, info: dict[str, Any]) -> bytes:
    import hashlib

    data = storage.read_bytes(storage.parse_uri(version_uri).join(name))
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise IntegrityError(f"{version_uri}/{name}: content does not match its recorded sha256")
    return data


def verify(version_uri: str, expected_manifest_sha256: str | None = None) -> dict[str, Any]:
    """Read a version's manifest and check every file's digest (and the manifest's own).
    Returns the manifest; raises IntegrityError naming the first mismatch."""
    _, manifest = read_manifest(version_uri, expected_manifest_sha256)
    for name, info in manifest["files"].items():
        _read_checked(version_uri, name, info)
    return manifest


def locate_version(uri: str) -> tuple[str, str | None]:
    """The version `uri` names: itself when it holds a manifest.json (no digest known), or,
    for a job prefix, the version its current.json points at with the digest recorded there
    (current.json exists only if the job's gates passed)."""
    uri = uri.rstrip("/")
    if storage.exists(f"{uri}/manifest.json"):
        return uri, None
    pointer = current(uri)
    if pointer is None:
        raise IntegrityError(
            f"{uri}: neither a published version (no manifest.json) nor a job with a "
            "passing version (no current.json)"
        )
    return f"{uri}/versions/{pointer['version']}", str(pointer["sha256"])


def resolve_version(uri: str, sha256: str | None) -> tuple[str, str]:
    """A version URI and the manifest digest to verify it against.

    `uri` is a version (…/versions/<run>, which then needs `sha256`) or a job prefix, whose
    current.json names the version and its digest.
    """
    version, recorded = locate_version(uri)
    if recorded is None:
        if sha256 is None:
            raise IntegrityError(
                f"{version}: a version URI needs the sha256 of its manifest.json; give it, "
                "or give the job prefix to follow its current.json"
            )
        return version, sha256
    if sha256 is not None and sha256 != recorded:
        raise IntegrityError(
            f"{uri.rstrip('/')}: current.json points at a manifest with sha256 {recorded}, "
            f"not the expected {sha256}"
        )
    return version, recorded


def fetch_verified(
    version_uri: str, expected_manifest_sha256: str | None, dest: Path, include: tuple[str, ...]
) -> dict[str, Any]:
    """Download the manifest and the files under `include` (prefixes such as "adapter/"; ""
    for all) into `dest`, checking each against its recorded digest (and the manifest against
    `expected_manifest_sha256` if given). Returns the manifest; raises IntegrityError naming
    the first mismatch, leaving nothing in `dest` it could be mistaken for.
    """
    import shutil

    body, manifest = read_manifest(version_uri, expected_manifest_sha256)
    try:
        for name, info in manifest["files"].items():
            if name.startswith(include):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(_read_checked(version_uri, name, info))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    (dest / "manifest.json").write_bytes(body)
    return manifest
