"""One training process or many: what the loop needs to know about its peers, in one small object.

`accelerate launch` (torchrun underneath) starts N copies of `python -m chroma_pipeline.train`
with RANK / WORLD_SIZE set. Every rank trains on its own batches; after each backward the
LoRA gradients are averaged across ranks, so every rank takes the same optimizer step and
holds the same adapter. Only rank 0 logs, renders, evaluates, checkpoints and saves.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters) -> None:
        if self.world > 1:
            for parameter in parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.world

    def mean(self, value: float, device: str = "cpu") -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], device=device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool, device: str = "cpu") -> bool:
        """True on every rank when it is true on one: ranks agree on stopping at the same step."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def gather(self, value) -> list:
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def from_environment(device_kind: str) -> Ranks:
    """The ranks torchrun / accelerate launch describe in the environment; one process when they do not."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        gpu = device_kind in ("cuda", "rocm")  # ROCm's RCCL answers to "nccl"
        if gpu:
            torch.cuda.set_device(local_rank)  # or every rank's collectives would land on GPU 0
        # CPU tensors (the loss, the stop flag, gathered objects) go through gloo, GPU ones through NCCL.
        # Rank 0 renders and evaluates alone while the others wait in the next all-reduce; at
        # 1024 px with many prompts that outlasts the default 10-minute collective timeout.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if gpu else "gloo", timeout=timedelta(hours=2))
    return Ranks(rank=dist.get_rank(), world=world, local_rank=local_rank)


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


class TrainingStopped(RuntimeError):
    """Training stopped on request after writing a checkpoint; re-running resumes from it."""
