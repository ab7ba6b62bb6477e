"""The overlap engine's extension of the runtime: parted stages run part by part and
their F&B pairs interleave; every other stage goes to the table's own kernels."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor, nn

from ..runtime.extension import Extension, PipelineInfo, register_extension
from ..runtime.kernels import ActionKernel, Kernels, PairKernel
from ..runtime.plan import ActionPlan
from ..runtime.run import StepRun
from ..schedules.actions import Op
from .engine import BackwardTask, ForwardTask, Waiter, run_pair
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


def _start_forward(run: StepRun, a: ActionPlan) -> ForwardTask:
    return ForwardTask(run.module(a), run.forward_inputs(a), _waiter(run))


def _finish_forward(run: StepRun, a: ActionPlan, task: ForwardTask) -> None:
    if task.grad:
        _records(run)[_key(a)] = task  # the backward's record, for this step only
    run.finish_forward(a, task.inputs, task.outputs, None)


def _start_backward(run: StepRun, a: ActionPlan, record: ForwardTask,
                    split: bool) -> tuple[BackwardTask, list[Tensor]]:
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    return BackwardTask(record, roots, grads, _waiter(run), split=split), leaves


def _finish_backward(run: StepRun, a: ActionPlan, task: BackwardTask,
                     leaves: list[Tensor]) -> None:
    if a.action.op is Op.INPUT:
        run.deferred[_key(a)] = task.weight if task.split else None
    else:
        task.weight.run()  # a full backward: whatever the waits did not absorb
    run.finish_backward(a, leaves, _input_grads(task, leaves))


def _forward(fallback: ActionKernel, run: StepRun, a: ActionPlan) -> None:
    """``F`` of a parted stage: its parts in order, each communication waited for
    before the next part."""
    if not is_parted(run.module(a)):
        fallback(run, a)
        return
    task = _start_forward(run, a)
    task.finish()
    _finish_forward(run, a, task)


def _backward(fallback: ActionKernel, run: StepRun, a: ActionPlan) -> None:
    """``B`` or ``I`` of a parted stage: each part's backward, last part first (input-only
    per part for an ``I`` with the split on, the weight work kept for its ``W``)."""
    record = _records(run).pop(_key(a), None)
    if record is None:
        fallback(run, a)
        return
    task, leaves = _start_backward(run, a, record, run.split and a.action.op is Op.INPUT)
    task.finish()
    _finish_backward(run, a, task, leaves)


def _pair(fallback: PairKernel, kernels: Kernels, run: StepRun, fwd: ActionPlan,
          bwd: ActionPlan) -> None:
    """``F+B`` whose backward is a parted stage's: the two interleaved
    (:func:`~dualpipe.overlap.run_pair`); a full backward splits per part when the split
    is on, so its weight work fills the waits. A stage class with its own
    ``overlapped_forward_backward``, or an ordinary backward, goes to ``fallback``."""
    own: Any = getattr(type(run.module(fwd)), "overlapped_forward_backward", None)
    records = _records(run)
    if own is not None or _key(bwd) not in records:
        fallback(kernels, run, fwd, bwd)
        return
    record = records.pop(_key(bwd))
    forward = _start_forward(run, fwd)
    backward, leaves = _start_backward(run, bwd, record, run.split)
    run_pair(forward, backward, fill_weight=bwd.action.op is Op.BACKWARD)
    _finish_forward(run, fwd, forward)
    _finish_backward(run, bwd, backward, leaves)
