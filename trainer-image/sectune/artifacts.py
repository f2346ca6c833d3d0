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

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sectune import storage
from sectune.contract import AdapterManifest, ManifestFile

MAX_ARTIFACT_BYTES = int(os.environ.get("SECTUNE_MAX_ARTIFACT_BYTES", str(8 << 30)))
"""Default cap on the files one version may make a reader download (all of them together).
A LoRA adapter of an 8B model is a few hundred MB; the cap only stops a store (or a manifest)
that would fill the reader's disk. `sectune serve --max-adapter-mb` sets it per server."""
POINTER_LIMIT = 64 << 10
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class IntegrityError(RuntimeError):
    """A stored file does not match the digest its manifest records."""


@dataclass(frozen=True)
class Published:
    uri: str
    """The version prefix (versions/<run id>)."""
    manifest_sha256: str
    adapter_bytes: int = 0
    """Bytes stored under adapter/ (weights and tokenizer)."""


def file_digests(stage: Path) -> dict[str, ManifestFile]:
    return {
        path.relative_to(stage).as_posix(): ManifestFile(
            sha256=storage.sha256_file(path), size=path.stat().st_size
        )
        for path in sorted(stage.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


def publish(
    stage: Path,
    job_prefix: storage.Location,
    run_id: str,
    manifest: AdapterManifest,
    make_current: bool = True,
) -> Published:
    """Upload a staged run: every file, then manifest.json (with their digests), then, if
    `make_current` (gates passed), the current.json pointer. Raises StorageError before the
    pointer moves if anything fails."""
    manifest = manifest.model_copy(update={"files": file_digests(stage)})
    body = manifest.to_json()
    (stage / "manifest.json").write_bytes(body)
    version = job_prefix.join("versions", run_id)
    for name in manifest.files:
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
    return Published(version.uri, digest, manifest.stored_bytes())


def current(job_prefix: str | storage.Location) -> dict[str, Any] | None:
    """The pointer to the job's published version, or None if nothing was published."""
    loc = storage.parse_uri(job_prefix) if isinstance(job_prefix, str) else job_prefix
    pointer = loc.join("current.json")
    if not storage.exists(pointer):
        return None
    try:
        parsed = json.loads(storage.read_bytes(pointer, POINTER_LIMIT))
        version, sha256 = str(parsed["version"]), str(parsed["sha256"])
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{pointer.uri}: not a current.json pointer") from None
    # The version becomes part of a URI and of local paths: one plain name, nothing else.
    if not VERSION_NAME.fullmatch(version) or not SHA256.fullmatch(sha256):
        raise IntegrityError(
            f"{pointer.uri}: version {version[:100]!r} or sha256 is malformed; refusing to follow it"
        )
    return dict(parsed)


def read_manifest(version_uri: str, expected_sha256: str | None) -> tuple[bytes, AdapterManifest]:
    """A version's manifest.json (raw and parsed), checked against `expected_sha256` if given,
    with every file entry's name, digest and recorded size checked."""
    body = storage.read_bytes(storage.parse_uri(version_uri).join("manifest.json"))
    actual = hashlib.sha256(body).hexdigest()
    if expected_sha256 and actual != expected_sha256:
        raise IntegrityError(
            f"{version_uri}/manifest.json: sha256 {actual} != expected {expected_sha256}"
        )
    try:
        manifest = AdapterManifest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(document)"
        raise IntegrityError(
            f"{version_uri}/manifest.json: {where}: {first['msg']}; not a manifest sectune wrote"
        ) from None
    for name in manifest.files:
        try:
            storage.safe_relative_name(name, f"{version_uri}/manifest.json")
        except storage.StorageError as exc:
            raise IntegrityError(str(exc)) from None
    return body, manifest


def _download_checked(version_uri: str, name: str, info: ManifestFile, target: Path) -> None:
    """Stream one file to `target`, never reading past its recorded size; digest checked."""
    source = storage.parse_uri(version_uri).join(name)
    try:
        sha256, size = storage.download_file(source, target, info.size)
    except storage.TooLarge:
        raise IntegrityError(
            f"{version_uri}/{name}: larger than the {info.size:,} bytes its manifest records"
        ) from None
    if sha256 != info.sha256 or size != info.size:
        target.unlink(missing_ok=True)
        raise IntegrityError(f"{version_uri}/{name}: content does not match its recorded sha256")


def verify(version_uri: str, expected_manifest_sha256: str | None = None) -> AdapterManifest:
    """Read a version's manifest and check every file's digest (and the manifest's own).
    Returns the manifest; raises IntegrityError naming the first mismatch."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sectune-verify-") as scratch:
        return fetch_verified(version_uri, expected_manifest_sha256, Path(scratch) / "v", ("",))


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
    version_uri: str,
    expected_manifest_sha256: str | None,
    dest: Path,
    include: tuple[str, ...],
    max_bytes: int = MAX_ARTIFACT_BYTES,
) -> AdapterManifest:
    """Download the manifest and the files under `include` (prefixes such as "adapter/"; ""
    for all) into `dest`, checking each against its recorded digest and size (and the manifest
    against `expected_manifest_sha256` if given). Every name must stay inside `dest`, and the
    files together may not exceed `max_bytes`; each is streamed to disk, never read past its
    recorded size. Returns the manifest; raises IntegrityError naming the first problem,
    leaving nothing in `dest` it could be mistaken for.
    """
    body, manifest = read_manifest(version_uri, expected_manifest_sha256)
    wanted = {n: i for n, i in manifest.files.items() if n.startswith(include)}
    total = sum(info.size for info in wanted.values())
    if total > max_bytes:
        raise IntegrityError(
            f"{version_uri}: its files add up to {total:,} bytes, over the {max_bytes:,}-byte "
            "cap (raise it with --max-adapter-mb or SECTUNE_MAX_ARTIFACT_BYTES if this is right)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name, info in wanted.items():
            try:
                target = storage.contained(dest, name, f"{version_uri}/manifest.json")
            except storage.StorageError as exc:
                raise IntegrityError(str(exc)) from None
            _download_checked(version_uri, name, info, target)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    (dest / "manifest.json").write_bytes(body)
    return manifest


def require_safetensors(adapter_dir: Path, version_uri: str) -> None:
    """Refuse an adapter directory that holds pickle-format weights, or no safetensors at all,
    before PEFT (which would unpickle a .bin) ever sees it."""
    pickles = sorted(
        p.relative_to(adapter_dir).as_posix()
        for p in adapter_dir.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise IntegrityError(
            f"{version_uri}: the adapter holds pickle-format files ({', '.join(pickles[:5])}); "
            "only safetensors are loaded. Re-save it with safe_serialization=True."
        )
    if not list(adapter_dir.glob("*.safetensors")):
        raise IntegrityError(f"{version_uri}: the adapter has no .safetensors weights")
