"""Process rank, barriers and device choice for rollout and scoring under `accelerate launch`.

Rollout and teacher scoring split their rows across the launched processes. Each process
writes its own chunk or shard files, and process 0 merges them after a barrier. Without a
launcher (or with one process) every helper here is a no-op, so the same code runs alone.
Training needs none of this, because transformers' Trainer shards its batches itself.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place among the launched processes, and the device it should use."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info() -> ProcessInfo:
    """Return rank, world size and device, initialising the process group when a launcher started us.

    accelerate's PartialState reads the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK)
    and picks the device: CUDA or NPU (when torch_npu is importable) by local rank, else CPU
    with the gloo backend.
    """
    from accelerate import PartialState

    if importlib.util.find_spec("torch_npu") is not None:
        # torch_npu registers the "npu" device type with torch when imported.
        import torch_npu  # noqa: F401

    # cpu=True on a machine without an accelerator makes accelerate start the gloo backend
    # for several processes; otherwise it stays single-process on CPU under torchrun.
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "npu") and torch.npu.is_available())
    state = PartialState(cpu=not has_accelerator)
    return ProcessInfo(rank=state.process_index, world_size=state.num_processes, device=state.device)


def barrier() -> None:
    """Wait until every launched process reaches this point (no-op for one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Return every process's `value`, in rank order; `[value]` for one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def shard_for_rank(items: list[T], info: ProcessInfo) -> list[T]:
    """Return this rank's share of `items`: every world_size-th item, starting at its rank.

    Striding (instead of contiguous blocks) keeps the shares balanced when `items` is sorted by
    length, so no process waits long at the next barrier.
    """
    return items[info.rank :: info.world_size]
