"""Storage URIs (file://, s3://, hf://): read, write, list, digest, atomic publish.

S3 settings come from the environment the operator fills from the job's Secret:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_ENDPOINT_URL (MinIO and other
S3-compatible stores) and AWS_REGION. Credentials are never part of a URI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHUNK = 1 << 20
METADATA_LIMIT = 64 << 20
"""Default bound on a whole-file read (manifests, pointers, reports): such files are small,
and a store that answers with gigabytes must not take the reader's memory with it."""


class StorageError(RuntimeError):
    """Storage could not be read or written; the message names the URI."""


class TooLarge(StorageError):
    """A file is larger than the read allows."""


def safe_relative_name(name: str, where: str) -> str:
    """`name` if it is a plain relative path (a/b/c) that stays under whatever it is joined to.

    Names read from storage (manifest entries, S3 keys, pointers) are untrusted: an absolute
    name, a `..` or `.` segment, a backslash, an empty segment or a control character is
    refused with a StorageError naming `where` it came from.
    """
    problem = None
    if not name or len(name) > 1024:
        problem = "is empty or longer than 1024 characters"
    elif name.startswith("/") or "\\" in name or (len(name) > 1 and name[1] == ":"):
        problem = "is absolute or uses backslashes"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "holds a control character"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        problem = "has an empty, '.' or '..' segment"
    if problem:
        raise StorageError(f"{where}: the name {name[:200]!r} {problem}; refusing to use it")
    return name


def contained(base: Path, name: str, where: str) -> Path:
    """`base / name`, refused unless the resolved path stays inside `base` (symlinks too)."""
    target = base / safe_relative_name(name, where)
    if not target.resolve().is_relative_to(base.resolve()):
        raise StorageError(f"{where}: {name[:200]!r} leads outside {base}; refusing to use it")
    return target


@dataclass(frozen=True)
class Location:
    """A parsed URI: scheme plus bucket/path (s3) or a local path (file)."""

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file://{self.key}"
        return f"{self.scheme}://{self.bucket}/{self.key}".rstrip("/")

    @property
    def path(self) -> Path:
        if self.scheme != "file":
            raise StorageError(f"{self.uri} is not a local path")
        return Path(self.key)

    def join(self, *parts: str) -> Location:
        suffix = "/".join(p.strip("/") for p in parts if p)
        if self.scheme == "file":
            return Location("file", "", str(Path(self.key, suffix)))
        key = f"{self.key.rstrip('/')}/{suffix}" if self.key else suffix
        return Location(self.scheme, self.bucket, key)


def parse_uri(uri: str) -> Location:
    """Parse a storage URI. file:// paths may use ~ and $VARS; relative ones are taken from
    the working directory (file://./runs)."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        raw = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
        path = Path(os.path.expandvars(os.path.expanduser(raw))).absolute()
        return Location("file", "", str(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket (s3://bucket/prefix)")
        return Location("s3", parsed.netloc, parsed.path.lstrip("/"))
    if parsed.scheme == "hf":
        return Location("hf", parsed.netloc, parsed.path.lstrip("/"))
    raise StorageError(f"{uri}: unsupported scheme {parsed.scheme!r}; use s3://, hf:// or file://")


def s3_client() -> Any:
    """An S3 client from this process's environment and its default credential chain: for the
    pod's own storage (the Secret a job or server mounts as env)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=os.environ.get("AWS_REGION") or "us-east-1",
        config=_client_config(),
    )


CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def tenant_s3_client(credentials: dict[str, str]) -> Any:
    """An S3 client that signs with `credentials` (a tenant Secret's values) and nothing else.

    The client can never fall back on the calling process's identity: the access key pair is
    required, and the session it comes from has no credential providers at all (no
    environment, no shared files, no IRSA or Pod Identity, no instance metadata), so a Secret
    that lacks keys is refused instead of silently signing as the operator."""
    import boto3
    import botocore.session

    missing = [k for k in CREDENTIAL_KEYS if not (credentials.get(k) or "").strip()]
    if missing:
        raise StorageError(
            f"the Secret carries no {' or '.join(missing)}; storage is only called with the "
            "Secret's own credentials, never the caller's"
        )
    core = botocore.session.Session()
    core.get_component("credential_provider").providers = []
    session = boto3.session.Session(
        aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"].strip(),
        aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"].strip(),
        aws_session_token=(credentials.get("AWS_SESSION_TOKEN") or "").strip() or None,
        region_name=credentials.get("AWS_REGION") or "us-east-1",
        botocore_session=core,
    )
    return session.client(
        "s3", endpoint_url=credentials.get("AWS_ENDPOINT_URL") or None, config=_client_config()
    )


def _client_config() -> Any:
    from botocore.config import Config

    return Config(retries={"max_attempts": 5, "mode": "standard"})


def _s3_error(action: str, loc: Location, exc: Exception) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return StorageError(f"could not {action} {loc.uri}: {code}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _too_large(loc: Location, max_bytes: int) -> TooLarge:
    return TooLarge(f"{loc.uri}: larger than the {max_bytes:,}-byte limit for this read")


def stream(uri: str | Location, max_bytes: int) -> Iterator[bytes]:
    """The file's content in chunks; StorageError as soon as it exceeds `max_bytes` (the
    size the store reports is checked first, then what actually arrives)."""
    loc = _storage_location(uri, "read")
    if loc.scheme == "file":
        try:
            handle = loc.path.open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"{loc.uri}: no such file") from None
        with handle:
            if os.fstat(handle.fileno()).st_size > max_bytes:
                raise _too_large(loc, max_bytes)
            yield from _bounded(iter(lambda: handle.read(CHUNK), b""), loc, max_bytes)
        return
    try:
        response = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        raise _s3_error("read", loc, exc) from None
    body = response["Body"]
    try:
        if int(response.get("ContentLength") or 0) > max_bytes:
            raise _too_large(loc, max_bytes)
        yield from _bounded(body.iter_chunks(CHUNK), loc, max_bytes)
    except StorageError:
        raise
    except Exception as exc:
        raise _s3_error("read", loc, exc) from None
    finally:
        body.close()


def _bounded(chunks: Iterator[bytes], loc: Location, max_bytes: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > max_bytes:
            raise _too_large(loc, max_bytes)
        yield chunk


def read_bytes(uri: str | Location, max_bytes: int = METADATA_LIMIT) -> bytes:
    """A whole file, refused (StorageError) when larger than `max_bytes`."""
    return b"".join(stream(uri, max_bytes))


def download_file(uri: str | Location, target: Path, max_bytes: int) -> tuple[str, int]:
    """Stream a file to `target` (through a partial file, renamed when complete); returns its
    sha256 and size. Nothing is left at `target` when it fails or exceeds `max_bytes`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    digest, size = hashlib.sha256(), 0
    try:
        with partial.open("wb") as handle:
            for chunk in stream(uri, max_bytes):
                digest.update(chunk)
                size += len(chunk)
                handle.write(chunk)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return digest.hexdigest(), size


def _storage_location(uri: str | Location, action: str) -> Location:
    """`uri` parsed, refused when it is hf://: the hub is a source of base models only, and
    every function here would otherwise treat it as an S3 bucket."""
    loc = parse_uri(uri) if isinstance(uri, str) else uri
    if loc.scheme == "hf":
        raise StorageError(
            f"{loc.uri}: cannot {action} hf:// URIs here; the hub is only a source of base "
            "models (baseModel.uri). Use s3:// or file:// for data and artifacts."
        )
    return loc


def replace_file(path: Path, data: bytes) -> None:
    """Put `data` at `path` all at once: written to a fresh file of a random name in the same
    folder (created exclusively, so a planted symlink there is never followed), flushed, then
    renamed over `path`. A symlink at `path` itself is refused, not written through."""
    if path.is_symlink():
        raise StorageError(f"{path}: is a symbolic link; refusing to write through it")
    mode = path.stat().st_mode & 0o777 if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str | Location, data: bytes) -> None:
    loc = _storage_location(uri, "write to")
    if loc.scheme == "file":
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(loc.path, data)
        return
    if loc.scheme == "s3":
        try:
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as exc:
            raise _s3_error("write", loc, exc) from None
        return
    raise AssertionError(loc.scheme)


def exists(uri: str | Location) -> bool:
    loc = _storage_location(uri, "look up")
    if loc.scheme == "file":
        return loc.path.exists()
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        if getattr(exc, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return False
        raise _s3_error("check", loc, exc) from None
    return True


def list_files(prefix: str | Location, client: Any = None) -> Iterator[str]:
    """Relative names of every file under a prefix (recursively). A stored key whose name
    is not a plain relative path (see `safe_relative_name`) raises StorageError."""
    loc = _storage_location(prefix, "list")
    if loc.scheme == "file":
        if loc.path.is_dir():
            for path in sorted(loc.path.rglob("*")):
                if path.is_file():
                    yield path.relative_to(loc.path).as_posix()
        return
    key_prefix = loc.key.rstrip("/") + "/"
    try:
        paginator = (client or s3_client()).get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=loc.bucket, Prefix=key_prefix)
        for page in pages:
            for item in page.get("Contents", []):
                yield safe_relative_name(item["Key"][len(key_prefix) :], loc.uri)
    except StorageError:
        raise
    except Exception as exc:
        raise _s3_error("list", loc, exc) from None


def upload_dir(local: Path, dest: str | Location) -> None:
    loc = _storage_location(dest, "upload to")
    if loc.scheme == "file":
        shutil.copytree(local, loc.path, dirs_exist_ok=True)
        return
    client = s3_client()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            target = loc.join(path.relative_to(local).as_posix())
            try:
                client.upload_file(str(path), target.bucket, target.key)
            except Exception as exc:
                raise _s3_error("upload to", target, exc) from None


def download_dir(src: str | Location, local: Path) -> Path:
    loc = _storage_location(src, "download")
    if loc.scheme == "file":
        if not loc.path.exists():
            raise StorageError(f"{loc.uri}: no such directory")
        return loc.path
    local.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    names = list(list_files(loc))
    if not names:
        raise StorageError(f"{loc.uri}: nothing stored under this prefix")
    for name in names:
        target = contained(local, name, loc.uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = loc.join(name)
        try:
            client.download_file(source.bucket, source.key, str(target))
        except Exception as exc:
            raise _s3_error("download", source, exc) from None
    return local


def delete_prefix(prefix: str | Location, client: Any = None) -> int:
    """Delete every object under a prefix; returns how many were deleted. `client`: an S3
    client with its own credentials (the operator's, from the job's Secret)."""
    loc = _storage_location(prefix, "delete")
    if loc.scheme == "file":
        count = sum(1 for _ in list_files(loc))
        shutil.rmtree(loc.path, ignore_errors=True)
        return count
    client = client or s3_client()
    names = list(list_files(loc, client))
    for start in range(0, len(names), 1000):
        batch = [{"Key": loc.join(n).key} for n in names[start : start + 1000]]
        try:
            client.delete_objects(Bucket=loc.bucket, Delete={"Objects": batch})
        except Exception as exc:
            raise _s3_error("delete", loc, exc) from None
    return len(names)
