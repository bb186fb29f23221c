"""One training process or many: the little that accelerate does not do for us.

`accelerate launch` (torchrun underneath) starts N copies of `python -m chroma_pipeline.train`,
on one machine or several. accelerate's `Accelerator` places the model, wraps it in DDP
(gradients bucketed and averaged across ranks), autocasts, scales fp16 losses, accumulates
and clips. What is left here: our collective timeout, pinning a GPU in a single process,
keeping frozen base weights out of DDP, ranks agreeing on a flag, and stopping on a signal.

accelerate is imported where a run starts (`process_state`, `make_accelerator`), not with this
module: defining the Dagster assets imports it, and must not pay for accelerate.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

from .device import DeviceInfo
from .errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState

# Rank 0 renders and evaluates alone while the others wait in the next collective; at
# 1024 px with many prompts that outlasts torch's default 10-minute timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def _prepare_single_process(device: DeviceInfo) -> None:
    """Prepare accelerate for a run that is not under `accelerate launch` (nothing to do under it).

    - accelerate trains one process on the *current* CUDA device: make that the pinned one
      (cuda:1, say). Under `accelerate launch` each rank takes the GPU of its LOCAL_RANK.
    - accelerate refuses to start on GPUs without peer-to-peer support (RTX 40xx on older
      drivers) unless NCCL's P2P/IB transports are off; `accelerate launch` turns them off
      itself, and one process never uses NCCL.
    - accelerate keeps its state in process-wide singletons that refuse a second training with
      another precision (or silently keep a CPU device): a long-lived process (a notebook, an
      in-process Dagster run) starts each training from a clean state.
    """
    from accelerate.state import AcceleratorState, GradientState

    if os.environ.get("WORLD_SIZE", "1") != "1":
        return
    if device.torch_device.startswith("cuda"):
        os.environ.setdefault("NCCL_P2P_DISABLE", "1")
        os.environ.setdefault("NCCL_IB_DISABLE", "1")
        if ":" in device.torch_device:
            torch.cuda.set_device(torch.device(device.torch_device))
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own reset (its tests use it)
    GradientState._reset_state()


def process_state(device: DeviceInfo) -> PartialState:
    """The processes of this run (one, or every rank under `accelerate launch`), with the process group up."""
    from accelerate import PartialState

    _prepare_single_process(device)
    return PartialState(cpu=device.kind == "cpu", timeout=COLLECTIVE_TIMEOUT)


def make_accelerator(device: DeviceInfo, dtype: torch.dtype, gradient_accumulation_steps: int) -> Accelerator:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    _prepare_single_process(device)
    mixed_precision = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return Accelerator(
        cpu=device.kind == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
            # Every rank loads the same frozen base from disk, so nothing but the LoRA needs syncing.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )


def keep_frozen_weights_out_of_ddp(model: torch.nn.Module) -> None:
    """DDP broadcasts every parameter and buffer from rank 0 when it wraps a model: for Chroma
    that is ~9B frozen weights, quantized ones among them (which its broadcast cannot flatten).
    Each rank loaded the same base from disk already; only the LoRA weights need to agree."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when it is true on one: ranks agree on stopping at the same step."""
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), reduction="sum")
    return bool(votes.item())


class StopRequest:
    """Set by SIGTERM or SIGINT (Dagster Pipes cancelling a run sends SIGINT; torchrun passes it on to
    its workers): finish the step, checkpoint, exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread (an in-process Dagster run): Dagster interrupts it itself
            self._previous = {}
        return self

    def _handle(self, _signum, _frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class TrainingStopped(UserError, RuntimeError):
    """Training stopped on request after writing a checkpoint; re-running resumes from it."""
