"""Functions run on spawned ranks by tests/runtime/test_extension.py: a recording
extension registered with the runtime sees every hook at the right point."""

from __future__ import annotations

from typing import Any

import torch

from dualpipe.errors import PipelineError
from dualpipe.runtime.extension import (
    Extension,
    PipelineInfo,
    register_extension,
    unregister_extension,
)
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.runtime.plan import ExecutionPlan, PlannedStep
from dualpipe.schedules.registry import layout_for

from .models import MLPStage, criterion, make_batch


class Recorder(Extension):
    """Logs its creation, every hook, and every step of the rank's list after it ran."""

    def __init__(self, pipeline: PipelineInfo) -> None:
        self.log: list[tuple[str, Any]] = [("attach", None)]

    def after_action(self, step: PlannedStep, following: PlannedStep | None) -> None:
        self.log.append(("step", tuple((a.module, a.action.op.value) for a in step.actions)))

    def step_plan(self, plan: ExecutionPlan) -> None:
        self.log.append(("step_plan", [tuple((a.module, a.action.op.value) for a in s.actions)
                                       for s in plan.steps]))

    def before_step(self, training: bool) -> None:
        self.log.append(("before_step", training))

    def after_stage_backward(self, stage_index: int) -> None:
        self.log.append(("after_stage_backward", stage_index))

    def after_step(self, training: bool) -> None:
        self.log.append(("after_step", training))

    def step_failed(self) -> None:
        self.log.append(("step_failed", None))

    def close(self) -> None:
        self.log.append(("close", None))


def refuser(pipeline: PipelineInfo) -> Extension:
    """Refuses every pipeline on pipeline rank 1."""
    if pipeline.rank == 1:
        raise ValueError("refused by the test extension: do something else")
    return Extension()


def record_hooks(rank: int, world: int, schedule: str) -> list[tuple[str, Any]]:
    """One training step and one inference step under a recording extension."""
    recorders: list[Recorder] = []

    def factory(pipeline: PipelineInfo) -> Recorder:
        recorders.append(Recorder(pipeline))
        return recorders[-1]

    register_extension(factory)
    try:
        stages = []
        for sid in layout_for(schedule, world).rank_stages[rank]:
            torch.manual_seed(sid)  # DualPipe's copies of a stage must be equal
            stages.append(MLPStage())
        pipe = Pipeline(stages, schedule, timeout=60)
    finally:
        unregister_extension(factory)
    chunks = 2 * world
    (x,), y = make_batch("mlp", 2 * chunks, seed=1)
    start = pipe.layout.streams_starting_on(rank)
    end = pipe.layout.streams_ending_on(rank)
    xs, ys = x.chunk(pipe.layout.num_streams), y.chunk(pipe.layout.num_streams)
    inputs = (xs[start[0]],) if start else ()
    labels = (ys[end[0]],) if end else ()
    pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
    with torch.no_grad():
        pipe.step(*inputs, num_chunks=chunks)
    pipe.close()
    assert len(recorders) == 1
    return recorders[0].log


def refuse_on_one_rank(rank: int, world: int) -> str:
    """An extension refusing on pipeline rank 1: that rank raises its own error at
    construction, and the other rank's construction fails at once too, naming it."""
    factory = register_extension(refuser)
    try:
        Pipeline([MLPStage(), MLPStage()], "dualpipev", timeout=60)
        raise AssertionError(f"rank {rank} built a pipeline that rank 1 refused")
    except ValueError as exc:
        assert rank == 1, exc
        return str(exc)
    except PipelineError as exc:
        assert rank == 0, exc
        return str(exc)
    finally:
        unregister_extension(factory)
