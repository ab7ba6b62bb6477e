"""Spawned-rank functions for the error-handling tests."""

from __future__ import annotations

import time

import torch
from torch import nn

from dualpipe.errors import PipelineError, ScheduleError
from dualpipe.runtime.pipeline import DualPipe, DualPipeV, Pipeline

from .models import MLPStage, criterion


class Exploding(MLPStage):
    """Raises on its third forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return super().forward(x)


def stage_failure(rank: int, world: int) -> tuple[str, float]:
    """DualPipeV where rank 1's first stage raises; every rank must raise quickly."""
    torch.manual_seed(0)
    mods = [Exploding() if rank == 1 else MLPStage(), MLPStage()]
    pipe = DualPipeV(mods, timeout=30.0)
    x, y = torch.randn(12, 8), torch.randn(12, 8)
    t0 = time.monotonic()
    try:
        if rank == 0:
            pipe.step(x, num_chunks=6, criterion=criterion, labels=(y,))
        else:
            pipe.step(num_chunks=6, criterion=criterion)
    except PipelineError as exc:
        return str(exc), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def bad_arguments(rank: int, world: int) -> dict[str, str]:
    """Each bad argument raises a clear error on the rank that got it, before any
    communication; returns the messages by case."""
    torch.manual_seed(0)
    messages: dict[str, str] = {}

    def expect(case: str, exc_type: type[Exception], fn) -> None:  # noqa: ANN001
        try:
            fn()
        except exc_type as exc:
            messages[case] = str(exc)
        else:
            raise AssertionError(f"{case}: expected {exc_type.__name__}")

    x, y = torch.randn(8, 8), torch.randn(8, 8)

    # a fresh pipeline per case: a failed step leaves a pipeline unusable
    def pipe() -> DualPipeV:
        return DualPipeV([MLPStage(), MLPStage()], timeout=20.0)

    if rank == 0:
        expect("zero chunks", ScheduleError,
               lambda: pipe().step(x, num_chunks=0, criterion=criterion, labels=(y,)))
        expect("uneven batch", ValueError,
               lambda: pipe().step(x[:7], num_chunks=4, criterion=criterion, labels=(y[:7],)))
        expect("no inputs", ValueError,
               lambda: pipe().step(num_chunks=4, criterion=criterion, labels=(y,)))
        expect("no criterion", ValueError, lambda: pipe().step(x, num_chunks=4, labels=(y,)))
        expect("label not a tensor", ValueError,
               lambda: pipe().step(x, num_chunks=4, criterion=criterion, labels=("y",)))
        expect("two devices", ValueError,
               lambda: DualPipeV([MLPStage(), nn.Linear(8, 8, device="meta")]))
        expect("one module", ValueError, lambda: DualPipeV([MLPStage()]))
        expect("unknown schedule", ScheduleError, lambda: Pipeline([MLPStage()], "zigzag"))
    else:
        expect("zero chunks", ScheduleError, lambda: pipe().step(num_chunks=0, criterion=criterion))
        expect("labels elsewhere", ValueError,
               lambda: pipe().step(num_chunks=4, criterion=criterion, labels=(y,)))
        expect("inputs elsewhere", ValueError,
               lambda: pipe().step(x, num_chunks=4, criterion=criterion))
        # rank 0's next two cases fail on rank 0 only: we must hear of it
        for case in ("told of rank 0's no inputs", "told of rank 0's no criterion"):
            expect(case, PipelineError, lambda: pipe().step(num_chunks=4, criterion=criterion))
    return messages


def odd_dualpipe(rank: int, world: int) -> str:
    """DualPipe on an odd number of ranks is refused at construction."""
    try:
        DualPipe([MLPStage(), MLPStage()])
    except ScheduleError as exc:
        return str(exc)
    return "accepted"


def mirrored(rank: int, world: int) -> list[bool]:
    """The two copies of each DualPipe stage: differing weights are refused, 'sync'
    aligns them, and gradients are summed unless turned off."""
    results = []
    torch.manual_seed(rank)  # different weights on each rank
    a, b = MLPStage(), MLPStage()
    try:
        DualPipe([a, b], timeout=20.0)
        results.append(False)
    except ValueError as exc:
        results.append("differ" in str(exc))
    pipe = DualPipe([a, b], mirrored_weights="sync", timeout=20.0)
    flat = torch.cat([p.detach().reshape(-1) for p in list(a.parameters()) + list(b.parameters())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    peer = gathered[world - 1 - rank]
    n_a = sum(p.numel() for p in a.parameters())
    # my module 0 mirrors the partner's module 1 and vice versa
    results.append(torch.equal(flat[:n_a], peer[n_a:]) and torch.equal(flat[n_a:], peer[:n_a]))
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    half = slice(0, 4) if rank == 0 else slice(4, 8)
    pipe.step(x[half], num_chunks=4, criterion=criterion, labels=(y[half],))
    grads = torch.cat([p.grad.reshape(-1) for p in list(a.parameters()) + list(b.parameters())])
    torch.distributed.all_gather(gathered, grads)
    peer = gathered[world - 1 - rank]
    results.append(torch.equal(grads[:n_a], peer[n_a:]) and torch.equal(grads[n_a:], peer[:n_a]))
    return results


def ddp_refused(rank: int, world: int) -> list[str]:
    """Stages wrapped by DistributedDataParallel (the stage itself, or a submodule) or by
    the DDP-based composable replicate are refused at construction on every rank; FSDP2's
    fully_shard is accepted."""
    from torch.distributed._composable.replicate import replicate
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    messages = []
    candidates = [
        lambda: [DistributedDataParallel(MLPStage()), MLPStage()],
        lambda: [MLPStage(), nn.Sequential(MLPStage(), DistributedDataParallel(MLPStage()))],
        lambda: [replicate(MLPStage()), MLPStage()],
    ]
    for build in candidates:
        try:
            DualPipeV(build(), timeout=20.0)
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    pipe = DualPipeV([fully_shard(MLPStage()), MLPStage()], timeout=20.0)
    pipe.close()
    messages.append("fully_shard accepted")
    return messages
