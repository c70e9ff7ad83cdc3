"""Process-group helpers for torchrun launches (NCCL on GPUs, gloo on CPUs); a plain run is world size 1."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from utils.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes, and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join torchrun's process group (RANK, LOCAL_RANK, WORLD_SIZE), or describe a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes)
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where tensors for a collective must live: this process's GPU under NCCL, else the CPU (gloo)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PeerError(RuntimeError):
    """A step that every process takes together failed on another process (that process reports why)."""


def all_ok(ok: bool) -> bool:
    """Whether ok holds on every process; a collective."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=collective_device())
    return bool(all_reduce_(flag, "min").item())


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'min' or 'max') across processes; a no-op in a single process."""
    if is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's obj, indexed by rank (a list of one in a single process)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def first_then_others(first: bool) -> Iterator[None]:
    """Run the block where ``first`` holds, then on the others; a failure still releases the others."""
    if not first and is_initialized():
        dist.barrier()
    try:
        yield
    finally:
        if first and is_initialized():
            dist.barrier()
