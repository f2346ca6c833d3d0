"""Storage URIs (file://, s3://, hf://): read, write, list, digest, atomic publish.

S3 settings come from the environment the operator fills from the job's Secret:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_ENDPOINT_URL (MinIO and other
S3-compatible stores) and AWS_REGION. Credentials are never part of a URI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHUNK = 1 << 20


class StorageError(RuntimeError):
    """Storage could not be read or written; the message names the URI."""


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


def s3_client(credentials: dict[str, str] | None = None) -> Any:
    """An S3 client from the environment, or from `credentials` (the same variable names)."""
    import boto3
    from botocore.config import Config

    source = credentials if credentials is not None else os.environ
    return boto3.client(
        "s3",
        endpoint_url=source.get("AWS_ENDPOINT_URL") or None,
        region_name=source.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=source.get("AWS_ACCESS_KEY_ID") if credentials is not None else None,
        aws_secret_access_key=source.get("AWS_SECRET_ACCESS_KEY")
        if credentials is not None
        else None,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def _s3_error(action: str, loc: Location, exc: Exception) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return StorageError(f"could not {action} {loc.uri}: {code}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_bytes(uri: str | Location) -> bytes:
    loc = parse_uri(uri) if isinstance(uri, str) else uri
    if loc.scheme == "file":
        try:
            return loc.path.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"{loc.uri}: no such file") from None
    if loc.scheme == "s3":
        try:
            return bytes(s3_client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())
        except Exception as exc:
            raise _s3_error("read", loc, exc) from None
    raise StorageError(f"{loc.uri}: reading hf:// files directly is not supported")


def write_bytes(uri: str | Location, data: bytes) -> None:
    loc = parse_uri(uri) if isinstance(uri, str) else uri
    if loc.scheme == "file":
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = loc.path.with_name(f".{loc.path.name}.partial")
        tmp.write_bytes(data)
        tmp.replace(loc.path)
        return
    if loc.scheme == "s3":
        try:
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as exc:
            raise _s3_error("write", loc, exc) from None
        return
    raise StorageError(f"{loc.uri}: cannot write to hf://")


def exists(uri: str | Location) -> bool:
    loc = parse_uri(uri) if isinstance(uri, str) else uri
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
    """Relative names of every file under a prefix (recursively)."""
    loc = parse_uri(prefix) if isinstance(prefix, str) else prefix
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
                yield item["Key"][len(key_prefix) :]
    except Exception as exc:
        raise _s3_error("list", loc, exc) from None


def upload_dir(local: Path, dest: str | Location) -> None:
    loc = parse_uri(dest) if isinstance(dest, str) else dest
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
    loc = parse_uri(src) if isinstance(src, str) else src
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
        target = local / name
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
    loc = parse_uri(prefix) if isinstance(prefix, str) else prefix
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
