"""Finding base models: the Hugging Face offline cache, safetensors only, clear errors."""

from __future__ import annotations

import shutil

import pytest

from sectune.config import BaseModelSpec, JobSpec
from sectune.training import base_model


def test_hf_uri_resolves_from_the_offline_cache(tiny_model_dir, tmp_path, monkeypatch):
    # The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<rev>/...}
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sectune-test--tiny"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    resolved = base_model.resolve(BaseModelSpec(uri="hf://sectune-test/tiny@main"))

    assert resolved.path == snapshot
    assert resolved.digest == base_model.weights_digest(tiny_model_dir)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(
        base_model.ModelError, match=r"pytorch_model\.bin: pickle checkpoints are refused"
    ):
        base_model.resolve(BaseModelSpec(uri=f"file://{tmp_path}"))


def test_missing_demo_model_says_how_to_get_it(tmp_path):
    with pytest.raises(base_model.ModelError, match="sectune models fetch-demo"):
        base_model.resolve(BaseModelSpec(uri=f"file://{tmp_path}/SmolLM2-135M-Instruct"))


def test_asking_for_gpus_on_a_cpu_machine_names_the_override(monkeypatch):
    import torch

    from sectune.runner import ResourceError, check_resources

    # a machine without a GPU, whichever machine runs the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    spec = JobSpec.model_validate(
        {
            "baseModel": {"uri": "hf://o/m"},
            "dataset": {"train": "s3://b/t"},
            "task": {"labels": ["a", "b"]},
            "resources": {"gpus": 1},
        }
    )
    with pytest.raises(ResourceError, match=r"sectune run --cpu MANIFEST"):
        check_resources(spec)
