"""The overlap engine's extension of the runtime: parted stages run part by part, their
pairs interleave and pending weight work fills their waits; other stages go to the
table's own kernels."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from torch import Tensor, nn

from ..runtime.extension import Extension, PipelineInfo, register_extension
from ..runtime.kernels import ActionKernel, Kernels, PairKernel
from ..runtime.plan import ActionPlan
from ..runtime.run import StepRun
from ..schedules.actions import Op
from .engine import BackwardTask, ForwardTask, Task, Waiter, WeightWorks, run_interleaved
from .parted import PartedStage

__all__ = ["is_parted", "OverlapExtension"]

_STATE = "overlap"
"""Key of this plug-in's per-step state in ``StepRun.extras``: the forward records of
parted stages, until their backward."""


def is_parted(module: nn.Module) -> bool:
    """Whether the runtime runs ``module`` part by part: a :class:`PartedStage` whose
    class does not define its own ``overlapped_forward_backward`` (that hook needs whole
    graphs: such a stage runs as an ordinary module, its communications blocking)."""
    return isinstance(module, PartedStage) and not hasattr(
        type(module), "overlapped_forward_backward")


class OverlapExtension(Extension):
    """Takes the ``F``, ``B``, ``I`` and pair kernels for parted stages."""

    name = "overlap"
    pairs = True

    def kernels(self, table: Kernels) -> Kernels:
        return table.replace(
            forward=partial(_forward, table.forward),
            backward=partial(_backward, table.backward),
            input=partial(_backward, table.input),
            pair=partial(_pair, table.pair),
        )


@register_extension
def _overlap_extension(info: PipelineInfo) -> OverlapExtension | None:
    """The overlap engine extends pipelines that hold a parted stage."""
    return OverlapExtension() if any(is_parted(m) for m in info.modules) else None


def _records(run: StepRun) -> dict[tuple[int, int], ForwardTask]:
    records: dict[tuple[int, int], ForwardTask] = run.extras.setdefault(_STATE, {})
    return records


def _key(a: ActionPlan) -> tuple[int, int]:
    return (a.action.phase, a.action.chunk)


_FRESH_CHECKS = False
"""For benchmarks only (``benchmarks/bench_profile.py --overlap``), not a setting: when
True, every poll of the waiter asks the store for failures
(``check_error(fresh=True)``, how the waits polled before the failure watch made the
check cheap), so the two can be measured side by side."""


def _waiter(run: StepRun) -> Waiter:
    """Bounded by the pipeline's timeout, failing at once when another rank failed;
    part events go to the step's record when there is one."""
    events = run.record.parts if run.record is not None else None
    check = (partial(run.transport.check_error, fresh=True) if _FRESH_CHECKS
             else run.transport.check_error)
    return Waiter(run.transport.timeout, check, events)


def _input_grads(task: BackwardTask, leaves: list[Tensor]) -> list[Tensor | None]:
    """The backward's input gradients for the executor's ``leaves`` (a subset of the
    forward's tensor inputs, matched by identity)."""
    inputs = [t for t in task.record.inputs if isinstance(t, Tensor)]
    by_id = {id(t): g for t, g in zip(inputs, task.input_grads, strict=True)}
    return [by_id.get(id(leaf)) for leaf in leaves]


def _start_forward(run: StepRun, a: ActionPlan, label: str = "F") -> ForwardTask:
    return ForwardTask(run.module(a), run.forward_inputs(a), _waiter(run), label)


def _finish_forward(run: StepRun, a: ActionPlan, task: ForwardTask) -> None:
    if task.grad:
        _records(run)[_key(a)] = task  # the backward's record, for this step only
    run.finish_forward(a, task.inputs, task.outputs, None)


def _start_backward(run: StepRun, a: ActionPlan, record: ForwardTask,
                    label: str = "B") -> tuple[BackwardTask, list[Tensor]]:
    """A parted backward; with the split on, per part input-only (the weight work kept:
    it fills waits, and a full ``B`` runs what is left when it ends)."""
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    task = BackwardTask(record, roots, grads, _waiter(run), split=run.split, label=label)
    return task, leaves


def _finish_backward(run: StepRun, a: ActionPlan, task: BackwardTask,
                     leaves: list[Tensor]) -> None:
    if a.action.op is Op.INPUT:
        run.deferred[_key(a)] = task.weight if task.split else None
    else:  # a full backward: whatever the waits did not absorb, one part's at a time
        t0 = time.perf_counter()
        while task.weight.run_one():
            t1 = time.perf_counter()
            task.waiter.log("weight", "weight", t0, t1)
            t0 = t1
    run.finish_backward(a, leaves, _input_grads(task, leaves))


def _filler(run: StepRun, tasks: Sequence[Task]) -> Callable[[], bool]:
    """What runs while a part waits: the oldest weight-gradient work pending on this
    rank — parted ``I``s' deferred work (its ``W`` then finds less to do), then the
    work of this step's own backwards — one part's work per call."""
    waiter = tasks[0].waiter

    def fill() -> bool:
        t0 = time.perf_counter()
        sources = [w for w in run.deferred.values() if isinstance(w, WeightWorks)]
        sources += [t.weight for t in tasks if isinstance(t, BackwardTask)]
        for works in sources:
            if works.run_one():
                waiter.log("weight", "weight", t0, time.perf_counter())
                return True
        return False

    return fill


def _forward(fallback: ActionKernel, run: StepRun, a: ActionPlan) -> None:
    """``F`` of a parted stage: its parts in order, each communication waited for
    before the next part (pending weight work filling the waits)."""
    if not is_parted(run.module(a)):
        fallback(run, a)
        return
    task = _start_forward(run, a)
    task.finish(_filler(run, (task,)))
    _finish_forward(run, a, task)


def _backward(fallback: ActionKernel, run: StepRun, a: ActionPlan) -> None:
    """``B`` or ``I`` of a parted stage: each part's backward, last part first (input-only
    per part with the split on, the weight work kept for waits and the ``W``)."""
    record = _records(run).pop(_key(a), None)
    if record is None:
        fallback(run, a)
        return
    task, leaves = _start_backward(run, a, record)
    task.finish(_filler(run, (task,)))
    _finish_backward(run, a, task, leaves)


def _pair(fallback: PairKernel, kernels: Kernels, run: StepRun, first: ActionPlan,
          second: ActionPlan) -> None:
    """A pair whose two halves are parted stages' (``F+B``, ``F+F``, ``B+B``): the two
    interleaved (:func:`~dualpipe.overlap.run_interleaved`; a backward's parts first in
    ``F+B``, as DeepSeek's overlap orders them), pending weight work filling the waits.
    A stage class with its own ``overlapped_forward_backward``, or a half that is not a
    parted stage's, goes to ``fallback`` (each half alone)."""
    own: Any = getattr(type(run.module(first)), "overlapped_forward_backward", None)
    records = _records(run)
    halves = (first, second)
    parted = all(is_parted(run.module(a)) if a.action.op is Op.FORWARD else _key(a) in records
                 for a in halves)
    fb = first.action.op is Op.FORWARD and second.action.op is not Op.FORWARD
    if not parted or (own is not None and fb):
        fallback(kernels, run, first, second)
        return
    letter = "F" if first.action.op is Op.FORWARD else "B"
    labels = ("F", "B") if fb else (letter, letter + "'")  # names in the part events
    tasks: list[Task] = []
    leaves: list[list[Tensor]] = []
    for a, label in zip(halves, labels, strict=True):
        if a.action.op is Op.FORWARD:
            tasks.append(_start_forward(run, a, label))
            leaves.append([])
        else:
            backward, kept = _start_backward(run, a, records.pop(_key(a)), label)
            tasks.append(backward)
            leaves.append(kept)
    run_interleaved(tasks[::-1] if fb else tasks, _filler(run, tasks))
    for a, task, kept in zip(halves, tasks, leaves, strict=True):
        if isinstance(task, ForwardTask):
            _finish_forward(run, a, task)
        else:
            _finish_backward(run, a, task, kept)
