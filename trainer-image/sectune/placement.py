"""Where a process computes and in which numerics: one policy for training, evaluation and
serving, so that every command follows the hardware it runs on.

    GPU                       weights bf16 (fp16 where the GPU lacks bf16), autocast to match
    CPU with native bf16      training: float32 weights + bf16 autocast; serving: bf16 weights
    (AVX512-BF16 or AMX)
    CPU without               float32 throughout (bf16 is emulated there: measured 6x slower)

A training process uses its own GPU (LOCAL_RANK under torchrun / accelerate), never cuda:0 for
every rank. Full fine-tuning keeps float32 master weights; the frozen base of LoRA and QLoRA is
held in the 16-bit type on GPUs (an 8B model: 16 GB instead of 32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

INFERENCE_PRECISIONS: tuple[str, ...] = ("auto", "bf16", "autocast", "fp32")


@dataclass(frozen=True)
class Numerics:
    """The device and number types one process computes with."""

    device: str
    """"cpu" or "cuda:N"."""
    weights: str
    """torch dtype name the weights are loaded in: float32, bfloat16 or float16."""
    autocast: str | None
    """torch dtype name of autocast around forward passes, or None for none."""

    @property
    def weights_dtype(self) -> Any:
        import torch

        return getattr(torch, self.weights)

    @property
    def mixed_precision(self) -> str:
        """accelerate's `mixed_precision` value for this policy."""
        return {"bfloat16": "bf16", "float16": "fp16"}.get(self.autocast or "", "no")

    def describe(self) -> str:
        """For logs and reports: "cuda:0, bfloat16 weights" or "cpu, float32 weights, bfloat16
        autocast"."""
        parts = [self.device, f"{self.weights} weights"]
        if self.autocast:
            parts.append(f"{self.autocast} autocast")
        return ", ".join(parts)


@cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None, capability: str | None = None) -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run in hardware. Without them torch emulates bf16 and
    a forward pass is several times slower than in float32. `capability` is the instruction
    set torch dispatches to (torch.backends.cpu.get_cpu_capability()): a process held to AVX2
    kernels (ATEN_CPU_CAPABILITY=avx2, as some fleets pin for reproducibility) emulates bf16
    even on a CPU that has it."""
    flags = cpu_flags() if flags is None else flags
    if capability is None:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    dispatched = capability.upper().startswith(("AVX512", "AMX"))
    return dispatched and ("avx512_bf16" in flags or "amx_bf16" in flags)


def process_device() -> str:
    """This process's device: its own GPU (LOCAL_RANK) when there is one, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def autocast(device_type: str, enabled: bool) -> Any:
    """torch.autocast to the device's 16-bit type (bf16; fp16 on GPUs without bf16)."""
    import torch

    half = _gpu_half() if device_type == "cuda" and enabled else "bfloat16"
    return torch.autocast(device_type, dtype=getattr(torch, half), enabled=enabled)


def _gpu_half() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def for_training(
    precision: str, method: str, device: str | None = None, native_bf16: bool | None = None
) -> Numerics:
    """Numerics of a training run (and of its own evaluation).

    `precision` is the job's hyperparameters.precision: auto, bf16, fp16 or fp32. `method` is
    the job's method.type: adapters (lora, qlora) hold the frozen base in 16 bits on GPUs;
    full fine-tuning keeps float32 weights and trains under autocast."""
    device = device or process_device()
    gpu = device.startswith("cuda")
    if precision == "fp32":
        return Numerics(device, "float32", None)
    if precision == "auto":
        if gpu:
            half = _gpu_half()
        else:
            native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
            half = "bfloat16" if native else ""
    else:
        half = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    if not half:
        return Numerics(device, "float32", None)
    adapter = method in ("lora", "qlora")
    weights = half if gpu and adapter else "float32"
    return Numerics(device, weights, half)


def for_serving(
    precision: str = "auto", device: str | None = None, native_bf16: bool | None = None
) -> Numerics:
    """Numerics of `sectune serve`: 16-bit weights where the hardware computes them natively
    (fastest), float32 where it does not. bf16 and autocast force a choice; fp32 is exact."""
    device = device or process_device()
    gpu = device.startswith("cuda")
    if precision == "auto":
        if gpu:
            return Numerics(device, _gpu_half(), None)
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        return Numerics(device, "bfloat16" if native else "float32", None)
    return _explicit(precision, device)


def for_evaluation(
    precision: str = "auto",
    method: str = "lora",
    device: str | None = None,
    native_bf16: bool | None = None,
) -> Numerics:
    """Numerics of `sectune evaluate --adapter`: by default those the training run evaluated
    with on this hardware, so re-evaluation and the training report agree."""
    if precision == "auto":
        return for_training("auto", method, device, native_bf16)
    return _explicit(precision, device or process_device())


def _explicit(precision: str, device: str) -> Numerics:
    if precision == "bf16":
        return Numerics(device, "bfloat16", None)
    if precision == "autocast":
        return Numerics(device, "float32", "bfloat16")
    if precision == "fp32":
        return Numerics(device, "float32", None)
    raise ValueError(f"--precision {precision!r}: choose one of {', '.join(INFERENCE_PRECISIONS)}")


def describe_hardware() -> str:
    """What a run computed on, in words, for its report."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
