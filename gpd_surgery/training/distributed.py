"""The processes of a run: torchrun's environment, the device of each process, per-epoch seeds, buffers.

Exact resume: all randomness of an epoch (data order, augmentation, dropout) derives from
``(seed, epoch, rank)`` (``epoch_seed``), so that a checkpoint at an epoch boundary holds everything
the rest of the run depends on.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GPDError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_env(device: str) -> DistEnv:
    """Read torchrun's environment; start the process group (gloo on CPU, nccl on CUDA) when it is a DDP run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    env = DistEnv(rank, world, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        env.initialized_here = True
    if dist.is_initialized():
        env.rank, env.world = dist.get_rank(), dist.get_world_size()
    return env


def pick_device(requested: str | None, env_local_rank: int) -> torch.device:
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GPDError("--device cuda was asked for, but no CUDA device is available")
        if name == "cuda":  # an explicit index: torch.cuda.set_device and DDP's device_ids need one
            name = f"cuda:{env_local_rank if int(os.environ.get('WORLD_SIZE', '1')) > 1 else torch.cuda.current_device()}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPDError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GPDError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise GPDError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    return device


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def sync_buffers(model: nn.Module, env: DistEnv) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    if env.active:
        for b in model.buffers():
            dist.broadcast(b, 0)
