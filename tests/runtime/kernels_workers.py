"""Spawned-rank functions for the overlapped forward/backward test."""

from __future__ import annotations

import copy

import torch

from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules.actions import Op, Overlap
from dualpipe.schedules.registry import layout_for

from .models import MLPStage, criterion
from .workers import _reference


class OriginalHook:
    """Mixin: the original's ``overlapped_forward_backward`` hook (forward of one
    micro-batch, then backward of the other), counting its calls per class."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(
        cls, module0, inputs0, criterion0, labels0, module1, loss1, outputs1, output_grads1
    ):  # noqa: ANN001, ANN206 - the original's signature
        cls.calls += 1
        outputs0 = module0(*inputs0)
        loss0 = criterion0(outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            torch.autograd.backward(outputs1, output_grads1)
        return outputs0, loss0


class OverlapStage(OriginalHook, MLPStage):
    """A stage that supplies the original's ``overlapped_forward_backward`` hook."""


def overlapped(rank: int, world: int, schedule: str, num_chunks: int) -> tuple[int, int]:
    """Train one step; check it against one process; return (hook calls, pairs)."""
    layout = layout_for(schedule, world)
    torch.manual_seed(0)
    stages = [OverlapStage() for _ in range(layout.num_stages)]
    ref = copy.deepcopy(stages)
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[rank]]
    pipe = Pipeline(mine, schedule, timeout=60)
    streams = layout.num_streams
    per_stream = 2 * num_chunks // streams
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(per_stream * streams, 8, generator=g),
        torch.randn(per_stream * streams, 8, generator=g),
    )
    data = [
        ((x[s * per_stream : (s + 1) * per_stream],), y[s * per_stream : (s + 1) * per_stream])
        for s in range(streams)
    ]
    start = [s for s, p in enumerate(layout.paths) if p[0][0] == rank]
    end = [s for s, p in enumerate(layout.paths) if p[-1][0] == rank]
    loss, _ = pipe.step(
        *(data[start[0]][0] if start else ()),
        num_chunks=num_chunks,
        criterion=criterion,
        labels=(data[end[0]][1],) if end else (),
    )
    OverlapStage.calls, calls = 0, OverlapStage.calls
    ref_losses, _ = _reference(ref, data, num_chunks // streams, train=True)
    if end:
        assert torch.equal(loss, torch.stack(ref_losses[end[0]]))
    for k, module in zip(layout.rank_stages[rank], mine, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert pipe.executor.last_plan is not None
    pipe_steps = pipe.executor.last_plan.schedule.steps[rank]
    pairs = sum(isinstance(s, Overlap) and s.second.op is Op.BACKWARD for s in pipe_steps)
    return calls, pairs
