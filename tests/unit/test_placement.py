"""The device and precision policy every command uses (sectune.placement), and the DeepSpeed
configuration training builds from a job, checked by DeepSpeed's own strict parser."""

from __future__ import annotations

import json

import pytest

from sectune import placement
from sectune.config import JobSpec, ManifestError, load_manifest
from sectune.training.distributed import deepspeed_config

AVX2_ONLY = frozenset({"avx", "avx2", "fma", "avx512f"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def test_native_bf16_is_read_from_the_cpu_flags_and_the_kernels_torch_dispatches():
    assert not placement.cpu_has_native_bf16(AVX2_ONLY, "AVX512")
    assert placement.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "AVX512")
    assert placement.cpu_has_native_bf16(frozenset({"avx512_bf16"}), "AVX512")
    # A process held to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2) emulates bf16 on any CPU.
    assert not placement.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "AVX2")
    assert not placement.cpu_has_native_bf16(SAPPHIRE_RAPIDS, "DEFAULT")


@pytest.mark.parametrize("purpose", ["training", "evaluation", "serving"])
def test_cpu_without_native_bf16_computes_in_float32_everywhere(purpose):
    """Emulated bf16 was measured 6x slower than float32 on an AVX2-only CPU."""
    numerics = {
        "training": lambda: placement.for_training("auto", "lora", "cpu", native_bf16=False),
        "evaluation": lambda: placement.for_evaluation("auto", "lora", "cpu", native_bf16=False),
        "serving": lambda: placement.for_serving("auto", "cpu", native_bf16=False),
    }[purpose]()
    assert numerics == placement.Numerics("cpu", "float32", None)
    assert numerics.mixed_precision == "no"


def test_cpu_with_native_bf16_trains_under_autocast_and_serves_bf16_weights():
    training = placement.for_training("auto", "lora", "cpu", native_bf16=True)
    assert training == placement.Numerics("cpu", "float32", "bfloat16")
    assert training.mixed_precision == "bf16"
    # Re-evaluation uses what training evaluated with, so the two reports agree.
    assert placement.for_evaluation("auto", "lora", "cpu", native_bf16=True) == training
    assert placement.for_serving("auto", "cpu", native_bf16=True).weights == "bfloat16"


def test_gpu_holds_the_frozen_base_in_16_bits_and_full_fine_tuning_in_float32(monkeypatch):
    monkeypatch.setattr(placement, "_gpu_half", lambda: "bfloat16")
    lora = placement.for_training("auto", "qlora", "cuda:3")
    assert lora == placement.Numerics("cuda:3", "bfloat16", "bfloat16")
    full = placement.for_training("auto", "full", "cuda:0")
    assert full == placement.Numerics("cuda:0", "float32", "bfloat16")
    assert placement.for_serving("auto", "cuda:0").weights == "bfloat16"
    monkeypatch.setattr(placement, "_gpu_half", lambda: "float16")  # e.g. a T4
    assert placement.for_training("auto", "lora", "cuda:0").mixed_precision == "fp16"


def test_explicit_precisions_are_obeyed():
    assert placement.for_training("fp32", "lora", "cpu", native_bf16=True).autocast is None
    assert placement.for_training("bf16", "lora", "cpu", native_bf16=False).autocast == "bfloat16"
    assert placement.for_serving("fp32", "cpu", native_bf16=True).weights == "float32"
    autocast = placement.for_evaluation("autocast", device="cpu")
    assert (autocast.weights, autocast.autocast) == ("float32", "bfloat16")
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        placement.for_serving("fp8", "cpu")


def test_each_rank_uses_its_own_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert placement.process_device() == "cuda:5"


def test_cli_precision_defaults_are_auto():
    from sectune.cli import build_parser

    parser = build_parser()
    serve = parser.parse_args(["serve", "--adapter", "a=file:///x"])
    evaluate = parser.parse_args(["evaluate", "--adapter", "file:///x", "--data", "file:///d"])
    assert serve.precision == evaluate.precision == "auto"


def _job(**distributed: object) -> JobSpec:
    return JobSpec.model_validate(
        {
            "baseModel": {"uri": "file:///models/m"},
            "dataset": {"train": "file:///data/train.jsonl"},
            "task": {"type": "classification", "labels": ["a", "b"]},
            "hyperparameters": {"batchSize": 3, "gradientAccumulation": 4},
            "resources": {
                "gpus": 8,
                "nodes": 2,
                "distributed": {"strategy": "deepspeed", **distributed},
            },
        }
    )


@pytest.mark.parametrize(
    ("stage", "offload", "half"), [(2, "none", "bfloat16"), (3, "cpu", "float16")]
)
def test_deepspeed_config_comes_from_the_job_and_deepspeed_accepts_it(stage, offload, half):
    from deepspeed.runtime.config import DeepSpeedConfig

    numerics = placement.Numerics("cuda:0", half, half)
    job = _job(zeroStage=stage, offload=offload)
    assert deepspeed_config(job, numerics, world=16)["train_batch_size"] == 3 * 4 * 16
    # Outside a process group DeepSpeed's parser sees one process.
    config = deepspeed_config(job, numerics, world=1)

    assert "auto" not in json.dumps(config)
    parsed = DeepSpeedConfig(config)  # strict: an unknown or mistyped key is an error
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.train_batch_size == 3 * 4
    assert parsed.bfloat16_config.enabled == (half == "bfloat16")
    assert parsed.float16_config.enabled == (half == "float16")
    offloaded = parsed.zero_config.offload_optimizer
    assert (offloaded is not None and offloaded.device == "cpu") == (offload == "cpu")
    if stage == 3:
        assert parsed.zero_config.offload_param.device == offload
        assert parsed.zero_config.gather_16bit_weights_on_model_save


def test_deepspeed_parser_refuses_a_typo():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config(_job(), placement.Numerics("cpu", "float32", None), world=1)
    config["zero_optimization"]["stgae"] = 2
    with pytest.raises(Exception, match="stgae"):
        DeepSpeedConfig(config)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {
                "baseModel": {"quantization": "nf4"},
                "method": {"type": "qlora"},
                "resources": {"gpus": 2, "distributed": {"strategy": "deepspeed"}},
            },
            "deepspeed with a quantized base .* is not implemented yet",
        ),
        (
            {
                "method": {"type": "full"},
                "resources": {"gpus": 2, "distributed": {"strategy": "deepspeed", "zeroStage": 3}},
            },
            "evaluation.baseline: .* zeroStage 3 is not implemented yet",
        ),
    ],
)
def test_combinations_that_do_not_run_yet_are_refused_by_name(tmp_path, spec, message):
    document = {
        "apiVersion": "sectune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "refused"},
        "spec": {
            "baseModel": {"uri": "file:///models/m", **spec.get("baseModel", {})},
            "dataset": {"train": "file:///data/train.jsonl"},
            "task": {"type": "classification", "labels": ["a", "b"], **spec.get("task", {})},
            "method": spec.get("method", {"type": "lora"}),
            "resources": spec.get("resources", {"gpus": 0}),
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(document))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)
