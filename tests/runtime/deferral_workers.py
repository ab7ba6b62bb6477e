"""Spawned-rank functions showing that weight-gradient work really runs in W actions."""

from __future__ import annotations

import time

import torch
from torch import nn

from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules.actions import Op, Overlap
from dualpipe.schedules.registry import layout_for


class LoggedWeight(torch.autograd.Function):
    """Identity on a weight whose backward notes when it ran."""

    log: list[float] = []

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return w.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        LoggedWeight.log.append(time.perf_counter())
        return grad


class Stage(nn.Module):
    """out = tanh(x @ a) + w: an input branch (and a matmul whose weight part is
    deferred too) next to a logged weight-only branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(8, 8) / 8)
        self.w = nn.Parameter(torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.a) + LoggedWeight.apply(self.w)


def _loss(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return ((out - label) ** 2).mean()


def where_weight_work_runs(rank: int, world: int, schedule: str, chunks: int) -> dict[str, int]:
    """Count, per kind of step (B, I, W, pair), how many weight-branch backwards ran
    inside it."""
    layout = layout_for(schedule, world)
    torch.manual_seed(0)
    pipe = Pipeline([Stage() for _ in layout.rank_stages[rank]], schedule, timeout=60)
    start = any(p[0][0] == rank for p in layout.paths)
    end = any(p[-1][0] == rank for p in layout.paths)
    x, y = torch.randn(2 * chunks, 8), torch.randn(2 * chunks, 8)
    LoggedWeight.log = []
    pipe.step(
        *((x,) if start else ()),
        num_chunks=chunks,
        criterion=_loss,
        labels=(y,) if end else (),
        record=True,
    )
    record = pipe.last_record
    assert record is not None
    counts = {"B": 0, "I": 0, "W": 0, "pair": 0, "outside": 0, "steps_W": 0}
    for t in LoggedWeight.log:
        for step, a, b in record.steps:
            if a <= t <= b:
                kind = "pair" if isinstance(step, Overlap) else step.op.value
                counts[kind] += 1
                break
        else:
            counts["outside"] += 1
    counts["steps_W"] = sum(
        1 for s, _, _ in record.steps if not isinstance(s, Overlap) and s.op is Op.WEIGHT
    )
    return counts
