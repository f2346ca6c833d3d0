"""How a training process joins the others: the Accelerator for this job, with the DeepSpeed
configuration built from the job itself (nothing left as "auto" for accelerate to guess).

    strategy ddp (or one process)   accelerate's own data parallelism (gloo on CPU, NCCL on GPUs)
    strategy deepspeed              ZeRO stage 2 or 3 from resources.distributed, batch sizes and
                                    accumulation from hyperparameters, bf16/fp16 from the job's
                                    numerics, optimizer (and at stage 3 weights) offloaded to CPU
                                    memory when offload: cpu

The Accelerator is made before the base model is loaded: at ZeRO-3 that makes transformers build
the model already partitioned (deepspeed.zero.Init), so no rank holds a full float32 copy.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sectune.config import JobSpec
from sectune.placement import Numerics

INIT_TIMEOUT_SECONDS = 600
"""How long a process waits for the others at the rendezvous before it gives up."""


class RendezvousError(RuntimeError):
    """This process could not join the others in time (an infrastructure failure: retried)."""


def uses_deepspeed(spec: JobSpec) -> bool:
    distributed = spec.resources.distributed
    return distributed is not None and distributed.strategy == "deepspeed"


def world_size() -> int:
    """Processes in this run, as the launcher (torchrun / accelerate launch) announced them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config(spec: JobSpec, numerics: Numerics, world: int) -> dict[str, Any]:
    """The DeepSpeed configuration for this job: every value decided here, none left "auto"."""
    distributed = spec.resources.distributed
    if distributed is None or distributed.strategy != "deepspeed":
        raise ValueError("resources.distributed.strategy is not deepspeed")
    hp = spec.hyperparameters
    offload = distributed.offload == "cpu"
    zero: dict[str, Any] = {
        "stage": distributed.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu" if offload else "none"},
    }
    if distributed.zero_stage == 3:
        zero |= {
            "offload_param": {"device": "cpu" if offload else "none"},
            # save_pretrained receives whole 16-bit weights gathered from every rank.
            "stage3_gather_16bit_weights_on_model_save": True,
        }
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": numerics.autocast == "bfloat16"},
        "fp16": {"enabled": numerics.autocast == "float16"},
        "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation,
        "train_batch_size": hp.batch_size * hp.gradient_accumulation * world,
        # The job's own AdamW runs on offloaded state too: DeepSpeed's compiled CPU Adam would
        # need a compiler and CUDA headers at run time in the training image.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_accelerator(spec: JobSpec, numerics: Numerics) -> Any:
    """The Accelerator for this process. Call it before loading the base model."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = None
    if uses_deepspeed(spec):
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(spec, numerics, world_size()))
    try:
        return _accelerator(spec, numerics, plugin)
    except RuntimeError as exc:  # torch's DistStoreError / DistNetworkError on a timeout
        if world_size() == 1:
            raise
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise RendezvousError(
            f"process {os.environ.get('RANK', '?')} of {world_size()} could not join the "
            f"others at {address} within {INIT_TIMEOUT_SECONDS} s ({type(exc).__name__}); check "
            "that every pod of the job started and that the job's headless Service resolves"
        ) from exc


def _accelerator(spec: JobSpec, numerics: Numerics, plugin: Any) -> Any:
    import datetime as dt

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(
        mixed_precision=numerics.mixed_precision,
        # accelerate turns DeepSpeed off when told cpu=True; DeepSpeed finds the CPU itself.
        cpu=numerics.device == "cpu" and plugin is None,
        deepspeed_plugin=plugin,
        gradient_accumulation_steps=spec.hyperparameters.gradient_accumulation,
        # The loop steps the schedule once per optimizer step, whatever the world size.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            InitProcessGroupKwargs(
                # accelerate picks no backend for DeepSpeed on CPU: name gloo, as DeepSpeed does.
                backend="gloo" if plugin is not None and numerics.device == "cpu" else None,
                timeout=dt.timedelta(seconds=INIT_TIMEOUT_SECONDS),
            )
        ],
    )


def describe(accelerator: Any) -> dict[str, Any]:
    """For the report: how the processes shared the work, as the Accelerator set it up."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        zero = plugin.deepspeed_config["zero_optimization"]
        return {
            "strategy": "deepspeed",
            "zeroStage": plugin.zero_stage,
            "offload": zero.get("offload_optimizer", {}).get("device", "none"),
            "processes": accelerator.num_processes,
        }
    strategy = "ddp" if accelerator.num_processes > 1 else "single"
    return {"strategy": strategy, "processes": accelerator.num_processes}


def zero3(accelerator: Any) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def gathered(
    accelerator: Any | None, params: list[Any], modifier_rank: int | None = None
) -> AbstractContextManager[Any]:
    """Whole values of `params` inside the block (collective at ZeRO-3: every rank enters it);
    with `modifier_rank`, what that rank writes is scattered back to the shards on exit.
    Without an accelerator, or below ZeRO-3, the parameters are whole already."""
    if accelerator is None or not zero3(accelerator):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
