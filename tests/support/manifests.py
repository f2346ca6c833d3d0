"""Lineage manifests for tests that publish versions by hand."""

from __future__ import annotations

from typing import Any

from sectune.contract import AdapterManifest, ManifestBaseModel

BASE = {"uri": "file:///models/base", "sha256": "0" * 64}


def adapter_manifest(job: str = "triage", run: str = "r1", **fields: Any) -> AdapterManifest:
    """A manifest as the trainer writes it, with only what the test names filled in."""
    return AdapterManifest(
        job=job,
        run=run,
        base_model=ManifestBaseModel.model_validate(fields.pop("base_model", BASE)),
        method=fields.pop("method", "lora"),
        config=fields.pop("config", {}),
        **fields,
    )


def manifest_json(files: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """manifest.json's content with the `files` table given as is (possibly malformed)."""
    return {**adapter_manifest(**fields).as_dict(), "files": files}
