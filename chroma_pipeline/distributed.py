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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def from_environment(device_kind: str) -> Ranks:
    """The ranks torchrun / accelerate launch describe in the environment; one process when they do not."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        # Rank 0 renders and evaluates alone while the others wait in the next all-reduce; at
        # 1024 px with many prompts that outlasts the default 10-minute collective timeout.
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", timeout=timedelta(hours=2))
    return Ranks(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


class StopRequest:
    """Set by SIGTERM (Dagster cancelling a run, torchrun stopping its workers): finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (an in-process Dagster run): Dagster interrupts it itself
            self._previous = None
        return self

    def _handle(self, _signum, _frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class TrainingStopped(RuntimeError):
    """Training stopped on request after writing a checkpoint; re-running resumes from it."""
