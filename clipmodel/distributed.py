"""Data-parallel helpers: which process this is, and collectives that are the identity in a single one.

The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), so the same
code runs as one plain process or as one of N ranks on one or several nodes.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def launched() -> bool:
    """True inside a process started by torchrun (or anything else that sets its environment)."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def relaunch(nproc: int, module: str) -> NoReturn:
    """Replace this process by torchrun running `python -m module` in `nproc` processes on this machine.

    The command line stays `python -m module` (DVC, Prefect); --standalone picks a free port itself.
    exec keeps the process id, so whoever started the stage still waits on (and can kill) its agent."""
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={nproc}", "-m", module])


def init(device: torch.device) -> None:
    """Join the process group torchrun described: NCCL between GPUs, gloo between CPU processes."""
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 alone logs, prints and writes files."""
    return rank() == 0


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` concatenated along dim 0, in rank order. The gradient of each part flows back
    to the rank that produced it, summed over the ranks whose losses used it."""
    if world() == 1:
        return x
    return torch.cat(dist_fn.all_gather(x))


def mean(x: torch.Tensor) -> torch.Tensor:
    """The average of a (detached) tensor over ranks: one value every rank agrees on."""
    if world() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()


def broadcast(obj):
    """Rank 0's picklable `obj` on every rank (e.g. a checkpoint only rank 0's disk holds)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
