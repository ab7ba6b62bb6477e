"""Spawned-rank functions for the lifecycle tests (closing, garbage collection, exit)."""

from __future__ import annotations

import gc
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dualpipe.errors import PipelineError
from dualpipe.runtime.pipeline import DualPipeV

from .failure_workers import Exploding
from .models import MLPStage, criterion


def _counts() -> tuple[int, int]:
    """OS threads and open file descriptors of this process."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def _one(rank: int, close: bool) -> int:
    """One pipeline on a new group, one step; returns the threads while it was alive."""
    group = dist.new_group([0, 1])
    pipe = DualPipeV([MLPStage(), MLPStage()], process_group=group, timeout=30)
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    if rank == 0:
        pipe.step(x, num_chunks=4, criterion=criterion, labels=(y,))
    else:
        pipe.step(num_chunks=4)
    alive = _counts()[0]
    if close:
        with pipe:
            pass
        assert pipe.closed
    del pipe  # not closed: released when collected
    gc.collect()
    dist.destroy_process_group(group)
    return alive


def create_and_close(rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int], int]:
    """(threads, fds) before and after 12 pipelines, each on a new group that is
    destroyed after (half closed, half just dropped), and the most threads while one
    was alive."""
    for _ in range(2):  # warm up whatever torch starts once per process
        _one(rank, close=True)
    gc.collect()
    time.sleep(0.2)  # sockets of a destroyed group close a moment later
    before = _counts()
    most = max(_one(rank, close=i % 2 == 0) for i in range(12))
    gc.collect()
    time.sleep(0.2)
    return before, _counts(), most


def exit_after_failure(rank: int, world: int, port: int) -> None:
    """Run as a script: a stage fails, every rank catches the error and returns; the
    process must then exit with code 0."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    mods = [Exploding() if rank == 1 else MLPStage(), MLPStage()]
    pipe = DualPipeV(mods, timeout=30)
    x, y = torch.randn(12, 8), torch.randn(12, 8)
    try:
        if rank == 0:
            pipe.step(x, num_chunks=6, criterion=criterion, labels=(y,))
        else:
            pipe.step(num_chunks=6)
    except PipelineError as exc:
        print(f"rank {rank} caught: {exc}", flush=True)
    time.sleep(0.5)  # rank 0 hosts the store
    dist.destroy_process_group()


if __name__ == "__main__":
    exit_after_failure(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
