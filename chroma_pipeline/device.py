"""Which accelerator we run on and what it can do.

Everything device-specific lives here so the rest of the code takes a `DeviceInfo`
and never asks torch.cuda itself. The Dagster GPU resource is a thin wrapper.
"""

from __future__ import annotations

import random
import resource
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .errors import DeviceUnavailable


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda", "rocm", "mps" or "cpu"
    name: str
    torch_device: str  # what torch.device() takes

    @property
    def supports_bf16(self) -> bool:
        if self.kind in ("cuda", "rocm"):
            return torch.cuda.is_bf16_supported()
        return self.kind == "mps"

    @property
    def quantization_backends(self) -> tuple[str, ...]:
        # bitsandbytes kernels exist for CUDA and ROCm only; quanto runs everywhere.
        return ("quanto", "bitsandbytes") if self.kind in ("cuda", "rocm") else ("quanto",)

    def compute_dtype(self, mixed_precision: str) -> torch.dtype:
        """The dtype to train and sample in, given the config's `mixed_precision`.

        CPUs compute in fp32: bf16 matmuls there are slower than fp32, not faster.
        A GPU without bf16 falls back to fp16.
        """
        if self.kind == "cpu" or mixed_precision == "no":
            return torch.float32
        if mixed_precision == "bf16" and self.supports_bf16:
            return torch.bfloat16
        return torch.float16

    def free_memory_bytes(self) -> int:
        if self.kind in ("cuda", "rocm"):
            free, _total = torch.cuda.mem_get_info(self.torch_device)  # the pinned GPU, not GPU 0
            return int(free)
        if self.kind == "mps":
            return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
        import psutil

        return int(psutil.virtual_memory().available)  # free pages plus the page cache the kernel can drop

    def reset_peak_memory(self) -> None:
        if self.kind in ("cuda", "rocm"):
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def peak_memory_bytes(self) -> int:
        """Peak accelerator memory since the last reset; on CPU, the process's peak RSS."""
        if self.kind in ("cuda", "rocm"):
            return int(torch.cuda.max_memory_allocated(self.torch_device))
        if self.kind == "mps":
            return int(torch.mps.driver_allocated_memory())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def empty_cache(self) -> None:
        if self.kind in ("cuda", "rocm"):
            torch.cuda.empty_cache()
        elif self.kind == "mps":
            torch.mps.empty_cache()


def detect_device(preference: str = "auto") -> DeviceInfo:
    """Pick CUDA, ROCm, MPS, then CPU; `preference` forces one ("cuda", "mps", "cpu", "cuda:1")."""
    if preference == "cpu":
        return DeviceInfo("cpu", "cpu", "cpu")
    if preference.startswith("cuda") or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device={preference!r} was asked for but torch sees no CUDA/ROCm GPU")
        index = int(preference.split(":")[1]) if ":" in preference else 0
        kind = "rocm" if torch.version.hip else "cuda"
        return DeviceInfo(kind, torch.cuda.get_device_name(index), f"cuda:{index}")
    if preference == "mps" or (preference == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise DeviceUnavailable("device='mps' was asked for but this torch build has no MPS support")
        return DeviceInfo("mps", "Apple MPS", "mps")
    if preference != "auto":
        raise DeviceUnavailable(f"unknown device {preference!r}; use auto, cuda, cuda:N, mps or cpu")
    return DeviceInfo("cpu", "cpu", "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
