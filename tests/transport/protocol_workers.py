"""Spawned-rank functions for the protocol tests: rebuilding on the same group,
disagreeing ranks, independent replicas, waits longer than the group's timeout."""

from __future__ import annotations

import copy
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.errors import PipelineError
from dualpipe.runtime.pipeline import DualPipeV, Pipeline
from tests.runtime.failure_workers import Exploding
from tests.runtime.models import MLPStage, criterion


class Slow(MLPStage):
    """Sleeps ``seconds`` in its first forward."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
            self.seconds = 0.0
        return super().forward(x)


def _reference(stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor, chunks: int,
               train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses and outputs of the whole model on one process, micro-batch by micro-batch."""
    losses, outs = [], []
    for xm, ym in zip(x.tensor_split(chunks), y.tensor_split(chunks), strict=True):
        h = xm
        for stage in stages:
            h = stage(h)
        loss = criterion(h, ym)
        if train:
            loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    return torch.stack(losses), torch.cat(outs)


def _v_step(pipe: Pipeline, rank: int, x: torch.Tensor, y: torch.Tensor, chunks: int
            ) -> tuple[torch.Tensor | None, object]:
    if rank == 0:
        return pipe.step(x, num_chunks=chunks, criterion=criterion, labels=(y,),
                         return_outputs=True)
    return pipe.step(num_chunks=chunks, criterion=criterion)


def rebuild_after_failure(rank: int, world: int) -> list[str]:
    """A step fails mid-way; a pipeline rebuilt on the same group then trains (DualPipeV)
    and infers (GPipe, 8 micro-batches) exactly."""
    report = []
    torch.manual_seed(0)
    stages = [MLPStage() for _ in range(2 * world)]
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    ids = (rank, 2 * world - 1 - rank)
    broken = [copy.deepcopy(stages[k]) for k in ids]
    if rank == 1:
        bomb = Exploding()
        bomb.load_state_dict(broken[0].state_dict())
        broken[0] = bomb
    failing = DualPipeV(broken, timeout=30)
    try:
        _v_step(failing, rank, x, y, 8)
        report.append("first step did not fail")
    except PipelineError as exc:
        report.append(f"failed: {exc}")
    pipe = DualPipeV([copy.deepcopy(stages[k]) for k in ids], timeout=30)
    x2, y2 = x + 1, y - 1
    loss, out = _v_step(pipe, rank, x2, y2, 8)
    ref = copy.deepcopy(stages)
    ref_loss, ref_out = _reference(ref, x2, y2, 8, train=True)
    if rank == 0:
        assert torch.equal(loss, ref_loss) and torch.equal(out, ref_out)
    for k, module in zip(ids, pipe.module, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    report.append("training exact")

    # GPipe inference: rank 1 fails in its third forward of the step
    line = [copy.deepcopy(stages[k]) for k in range(world)]
    mine: nn.Module = copy.deepcopy(line[rank])
    if rank == 1:
        mine = Exploding()
        mine.load_state_dict(line[1].state_dict())
    with torch.no_grad():
        failing = Pipeline([mine], "gpipe", timeout=30)
        try:
            failing.step(*((x,) if rank == 0 else ()), num_chunks=8, criterion=criterion,
                         labels=(y,) if rank == 1 else ())
            report.append("inference did not fail")
        except PipelineError:
            report.append("inference failed")
        pipe = Pipeline([copy.deepcopy(line[rank])], "gpipe", timeout=30)
        loss, out = pipe.step(*((x2,) if rank == 0 else ()), num_chunks=8, criterion=criterion,
                              labels=(y2,) if rank == 1 else (), return_outputs=True)
        ref_loss, ref_out = _reference(line, x2, y2, 8, train=False)
    if rank == 1:
        assert torch.equal(out, ref_out), "rebuilt inference differs"
        assert torch.equal(loss, ref_loss)
    report.append("inference exact")
    time.sleep(0.5)  # rank 0 hosts the store
    return report


def disagreements(rank: int, world: int) -> list[tuple[str, float]]:
    """Ranks that disagree fail quickly with an error naming what they disagree on; the
    group stays usable for the next pipeline."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 8), torch.randn(24, 8)
    results: list[tuple[str, float]] = []

    def attempt(fn) -> None:  # noqa: ANN001
        t0 = time.monotonic()
        try:
            fn()
            results.append(("no error", time.monotonic() - t0))
        except PipelineError as exc:
            results.append((str(exc), time.monotonic() - t0))

    def mods() -> list[nn.Module]:
        return [MLPStage(), MLPStage()]

    # num_chunks: 4 on rank 0, 6 on rank 1
    pipe = DualPipeV(mods(), timeout=30)
    attempt(lambda: _v_step(pipe, rank, x, y, 4 if rank == 0 else 6))
    # schedule, static_shapes: refused at construction
    attempt(lambda: Pipeline(mods(), "dualpipe" if rank == 0 else "dualpipev", timeout=30,
                             mirrored_weights="ignore"))
    attempt(lambda: DualPipeV(mods(), timeout=30, static_shapes=rank == 0))
    # training on rank 0, inference on rank 1
    pipe = DualPipeV(mods(), timeout=30)
    with torch.set_grad_enabled(rank == 0):
        attempt(lambda: _v_step(pipe, rank, x, y, 4))
    # static shapes promised on one rank only after construction
    pipe = DualPipeV(mods(), timeout=30)
    if rank == 1:
        pipe.set_p2p_tensor_shapes([(3, 8)])
    attempt(lambda: _v_step(pipe, rank, x, y, 4))
    # and the group still works
    pipe = DualPipeV(mods(), timeout=30)
    attempt(lambda: _v_step(pipe, rank, x, y, 4))
    time.sleep(0.5)
    return results


def replicas(rank: int, world: int) -> list[str]:
    """Two data-parallel replicas on groups [0, 1] and [2, 3]: replica 0 fails, and so does
    replica 1 (one failure domain per job), naming the process that failed; then both
    rebuild their pipelines on the same groups and train exactly."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    replica, local = divmod(rank, 2)
    torch.manual_seed(0)
    stages = [MLPStage() for _ in range(4)]
    x, y = torch.randn(8, 8), torch.randn(8, 8)  # the same on every rank
    ids = (local, 3 - local)
    mods = [copy.deepcopy(stages[k]) for k in ids]
    if replica == 0 and local == 1:
        bomb = Exploding()
        bomb.load_state_dict(mods[0].state_dict())
        mods[0] = bomb
    pipe = DualPipeV(mods, process_group=groups[replica], timeout=30)
    report = []
    for step in range(2):
        try:
            _v_step(pipe, local, x, y, 4)
            report.append(f"step {step} ok")
        except PipelineError as exc:
            report.append(f"step {step} failed: {exc}")
            break
        time.sleep(0.3)  # replica 0 fails meanwhile
    pipe.close()
    dist.barrier()  # every replica has failed by now
    mods = [copy.deepcopy(stages[k]) for k in ids]
    with DualPipeV(mods, process_group=groups[replica], timeout=30) as pipe:
        loss, _ = _v_step(pipe, local, x, y, 4)
    ref = copy.deepcopy(stages)
    ref_loss, _ = _reference(ref, x, y, 4, train=True)
    if local == 0:
        assert torch.equal(loss, ref_loss)
    for k, module in zip(ids, mods, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    report.append("rebuilt: exact")
    dist.barrier()
    return report


def slower_than_group_timeout(rank: int, world: int) -> tuple[float, bool]:
    """A stage that takes 3 s on a group whose timeout is 1 s: the pipeline's timeout (30 s)
    is what bounds its waits, so the step completes, exactly."""
    group = dist.new_group([0, 1], timeout=timedelta(seconds=1))
    torch.manual_seed(0)
    stages = [MLPStage() for _ in range(4)]
    ids = (rank, 3 - rank)
    mods = [copy.deepcopy(stages[k]) for k in ids]
    if rank == 1:
        slow = Slow(3.0)
        slow.load_state_dict(mods[0].state_dict())
        mods[0] = slow
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    t0 = time.monotonic()
    with DualPipeV(mods, process_group=group, timeout=30) as pipe:
        loss, _ = _v_step(pipe, rank, x, y, 4)
    elapsed = time.monotonic() - t0
    exact = True
    if rank == 0:
        exact = torch.equal(loss, _reference(copy.deepcopy(stages), x, y, 4, train=True)[0])
    dist.barrier()
    return elapsed, exact
