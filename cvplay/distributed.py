"""Multi-process training with torchrun: process group set-up, reductions, the launcher.

``train.nproc > 1`` makes the train stage re-launch itself under
``torchrun --standalone --nproc-per-node=N``; each rank then trains on its shard of every
global batch (see ``cvplay.data.DeviceBatches``), DDP averages the gradients, sums are
reduced once per epoch, and only rank 0 writes files. Multi-node: run
``torchrun --nnodes=M --node-rank=K --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT
--nproc-per-node=N -m stages.train`` on every node yourself (see README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed() -> Dist:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); no-op otherwise."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place); the tensor itself when not distributed."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def launch_torchrun(nproc: int, module: str) -> int:
    """Run ``python -m module`` as ``nproc`` processes under torchrun on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
    ]
    return subprocess.run(cmd, check=False).returncode
