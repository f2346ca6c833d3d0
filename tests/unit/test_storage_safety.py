"""Untrusted names and sizes from storage: manifests, S3 keys and pointers never write outside
the destination, files are never read past their recorded size, adapters are safetensors only,
and hf:// is refused where it would have fallen into the S3 code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sectune import artifacts, storage
from support.manifests import manifest_json


def _publish(tmp_path: Path, files: dict[str, bytes], entries: dict | None = None) -> str:
    """A stored version whose manifest lists `entries` (default: the files, honestly)."""
    version = tmp_path / "store" / "job" / "versions" / "r1"
    version.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (version / name).parent.mkdir(parents=True, exist_ok=True)
        (version / name).write_bytes(data)
    listed = (
        entries
        if entries is not None
        else {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()
        }
    )
    (version / "manifest.json").write_text(json.dumps(manifest_json(listed)))
    return f"file://{version}"


def test_manifest_names_that_escape_the_destination_are_refused(tmp_path):
    payload = b"pwned"
    digest = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    (tmp_path / "store" / "escaped").mkdir(parents=True)
    (tmp_path / "store" / "escaped" / "x").write_bytes(payload)
    for name in ("adapter/../../../escaped/x", "/etc/x", "adapter\\..\\x", "adapter//x"):
        uri = _publish(tmp_path, {}, {name: digest})
        dest = tmp_path / "dl" / "v"
        with pytest.raises(artifacts.IntegrityError, match="refusing"):
            artifacts.fetch_verified(uri, None, dest, include=("",))
        assert not (tmp_path / "escaped").exists() and not dest.exists()


def test_a_file_larger_than_its_manifest_says_is_not_read_past_that_size(tmp_path):
    big = b"x" * 10_000
    entries = {"adapter/adapter_model.safetensors": {"sha256": "0" * 64, "size": 100}}
    uri = _publish(tmp_path, {"adapter/adapter_model.safetensors": big}, entries)
    with pytest.raises(artifacts.IntegrityError, match="larger than the 100 bytes"):
        artifacts.fetch_verified(uri, None, tmp_path / "dl", include=("adapter/",))
    assert not (tmp_path / "dl").exists()


def test_a_version_over_the_cap_is_refused_before_any_download(tmp_path):
    uri = _publish(tmp_path, {"adapter/a.safetensors": b"y" * 2048})
    with pytest.raises(artifacts.IntegrityError, match="over the 1,024-byte cap"):
        artifacts.fetch_verified(uri, None, tmp_path / "dl", ("adapter/",), max_bytes=1024)


def test_reads_are_bounded(tmp_path):
    (tmp_path / "big.json").write_bytes(b"{" + b" " * 5000 + b"}")
    with pytest.raises(storage.TooLarge, match="4,096-byte limit"):
        storage.read_bytes(f"file://{tmp_path}/big.json", 4096)


def test_pickle_adapters_are_refused_before_peft_sees_them(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(artifacts.IntegrityError, match=r"pickle-format files \(adapter_model\.bin"):
        artifacts.require_safetensors(adapter, "s3://b/v")
    (adapter / "adapter_model.bin").unlink()
    with pytest.raises(artifacts.IntegrityError, match=r"no \.safetensors"):
        artifacts.require_safetensors(adapter, "s3://b/v")
    (adapter / "adapter_model.safetensors").write_bytes(b"ok")
    artifacts.require_safetensors(adapter, "s3://b/v")


def test_current_json_cannot_point_outside_its_job(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "current.json").write_text(json.dumps({"version": "../../other", "sha256": "a" * 64}))
    with pytest.raises(artifacts.IntegrityError, match="malformed"):
        artifacts.locate_version(f"file://{job}")


@pytest.mark.parametrize(
    "call",
    [storage.exists, lambda u: list(storage.list_files(u)), storage.delete_prefix],
)
def test_hf_uris_are_refused_where_only_storage_makes_sense(call):
    with pytest.raises(storage.StorageError, match="hf:// URIs"):
        call("hf://org/model")


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/abs", "a\\b", "", "a//b", "a/./b", "c:x", "a\x00b"]
)
def test_unsafe_relative_names(name):
    with pytest.raises(storage.StorageError):
        storage.safe_relative_name(name, "s3://b/p")


def test_safe_names_pass():
    assert storage.safe_relative_name("adapter/adapter_model.safetensors", "x")


def test_a_tenant_client_never_signs_with_the_callers_identity(monkeypatch):
    """A Secret without keys is refused even when this process's environment holds valid
    ones; with keys, the client signs with them and nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "operator-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-secret")
    for secret in ({"AWS_REGION": "eu-west-1"}, {"AWS_ACCESS_KEY_ID": "tenant"}, {}):
        with pytest.raises(storage.StorageError, match="never the caller's"):
            storage.tenant_s3_client(secret)
    client = storage.tenant_s3_client(
        {"AWS_ACCESS_KEY_ID": "tenant-key", "AWS_SECRET_ACCESS_KEY": "tenant-secret"}
    )
    credentials = client._request_signer._credentials.get_frozen_credentials()
    assert (credentials.access_key, credentials.secret_key) == ("tenant-key", "tenant-secret")
