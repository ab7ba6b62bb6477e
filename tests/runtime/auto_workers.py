"""Rank functions of the auto-scheduler's runtime test (run by dualpipe.testing)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from dualpipe.autoschedule import costs_from_timeline
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules import Schedule

from .models import build_stages, criterion, make_batch
from .workers import _reference


def train_auto_schedule(rank: int, world: int, data: dict[str, Any], kinds: list[str]) -> Any:
    """One recorded training step of an auto schedule per model kind: losses bit-equal and
    gradients equal to the single-process model; rank 0 returns the costs read back from
    each step's timeline."""
    return [_train(rank, data, kind) for kind in kinds]


def _train(rank: int, data: dict[str, Any], kind: str) -> Any:
    schedule = Schedule.from_dict(data)
    layout = schedule.layout
    chunks = schedule.chunks_per_stream
    stages = build_stages(kind, layout.num_stages, seed=3)
    ref = copy.deepcopy(stages)
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[rank]]
    pipe = Pipeline(mine, schedule, timeout=60)
    inputs, labels = make_batch(kind, 2 * chunks, seed=4)
    if rank == 0:  # V layout: inputs, labels and loss on rank 0
        loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=(labels,),
                            record=True)  # fmt: skip
        ref_losses, _ = _reference(ref, [(inputs, labels)], chunks, train=True)
        assert loss is not None
        assert torch.equal(loss, torch.stack(ref_losses[0])), (loss, ref_losses)
    else:
        pipe.step(num_chunks=chunks, criterion=criterion, record=True)
        _reference(ref, [(inputs, labels)], chunks, train=True)
    for k, module in zip(layout.rank_stages[rank], mine, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    timeline = pipe.gather_timeline()
    if timeline is None:
        return None
    costs = costs_from_timeline(timeline)
    return [costs.f, costs.b, costs.w, costs.pair, costs.comm]
