"""The launch files in training/launch/ are valid for the libraries that read them. DeepSpeed
needs a GPU to run; its configuration is checked here by DeepSpeed's own (strict) parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "trainer-image" / "sectune" / "training" / "launch"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_config_is_valid(stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads((LAUNCH / f"deepspeed-zero{stage}.json").read_text())
    # accelerate fills the "auto" batch sizes from the job's hyperparameters.
    config.update(
        train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4, train_batch_size=16
    )
    parsed = DeepSpeedConfig(config)
    assert parsed.zero_config.stage == stage
    assert parsed.gradient_clipping == 1.0
    if stage == 3:
        assert parsed.zero_config.gather_16bit_weights_on_model_save  # safetensors-able weights


def test_deepspeed_parser_refuses_a_typo():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = json.loads((LAUNCH / "deepspeed-zero2.json").read_text())
    config.update(
        train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4, train_batch_size=16
    )
    config["zero_optimization"]["overlap_comms"] = True
    with pytest.raises(Exception, match="overlap_comms"):
        DeepSpeedConfig(config)


@pytest.mark.parametrize("name", ["ddp-gpu.yaml", "deepspeed.yaml"])
def test_accelerate_launch_config_loads(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(LAUNCH / name))
    assert config.num_processes == 8
    if name == "deepspeed.yaml":
        assert config.deepspeed_config["deepspeed_config_file"] == "deepspeed-zero2.json"
