"""Process group set-up from torchrun's environment, and the few collectives the trainer uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs. ``is_main`` alone writes logs, checkpoints and recordings."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistributedContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and start the process group.

    NCCL on GPUs, gloo on the CPU. Without torchrun this is a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistributedContext(rank, world_size, local_rank, chosen)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def mean_over_processes(values: dict[str, float], ctx: DistributedContext) -> dict[str, float]:
    """Average scalar values over processes (for logging)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    tensor /= ctx.world_size
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_processes(flag: bool, ctx: DistributedContext) -> bool:
    """True when ``flag`` is true on every process (so all processes take the same branch)."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([0.0 if flag else 1.0], device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() == 0.0)


def gather_objects(items: list[Any], ctx: DistributedContext) -> list[Any]:
    """Concatenate a list from every process (on every process)."""
    if not ctx.enabled:
        return items
    gathered: list[list[Any] | None] = [None] * ctx.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]
