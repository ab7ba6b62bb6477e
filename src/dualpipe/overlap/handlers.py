"""What the executor runs for a stage written as parts: its forward, its backward and
the F&B pair, in the executor's terms (input leaves, output roots, deferred work)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from .engine import BackwardTask, ForwardTask, Waiter, WeightWorks, run_pair
from .stage import PartedStage

__all__ = ["is_parted", "parted_forward", "parted_backward", "parted_pair"]


def is_parted(module: nn.Module) -> bool:
    """Whether the runtime runs ``module`` part by part: a :class:`PartedStage` whose
    class does not define its own ``overlapped_forward_backward`` (that hook needs whole
    graphs: such a stage runs as an ordinary module, its communications blocking)."""
    return isinstance(module, PartedStage) and not hasattr(
        type(module), "overlapped_forward_backward")


def _for_leaves(task: BackwardTask, leaves: Sequence[Tensor]) -> list[Tensor | None]:
    """The input gradients of ``task`` for the executor's ``leaves`` (a subset of the
    forward's tensor inputs, by identity)."""
    inputs = [t for t in task.record.inputs if isinstance(t, Tensor)]
    by_id = {id(t): g for t, g in zip(inputs, task.input_grads, strict=True)}
    return [by_id.get(id(leaf)) for leaf in leaves]


def parted_forward(module: nn.Module, inputs: Sequence[Any], waiter: Waiter) -> ForwardTask:
    """Run one micro-batch's forward part by part; the finished task (its ``outputs``,
    and the record its backward needs)."""
    task = ForwardTask(module, inputs, waiter)
    task.finish()
    return task


def parted_backward(
    record: ForwardTask,
    roots: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor | None],
    leaves: Sequence[Tensor],
    input_only: bool,
    split: bool,
    waiter: Waiter,
) -> tuple[list[Tensor | None], WeightWorks | None]:
    """Run one micro-batch's backward part by part: the gradients for ``leaves`` and,
    for an input-only backward with ``split``, the weight-gradient work left for W."""
    task = BackwardTask(record, roots, grads, waiter, split=split and input_only)
    task.finish()
    return _for_leaves(task, leaves), task.weight if split and input_only else None


def parted_pair(
    module0: nn.Module,
    inputs0: Sequence[Any],
    record1: ForwardTask,
    roots1: Sequence[Tensor | GradientEdge],
    grads1: Sequence[Tensor | None],
    leaves1: Sequence[Tensor],
    input_only: bool,
    split: bool,
    waiter: Waiter,
) -> tuple[ForwardTask, list[Tensor | None], WeightWorks | None]:
    """Run an F&B pair interleaved (:func:`~dualpipe.overlap.run_pair`): the forward's
    finished task, the backward's gradients for ``leaves1`` and, for an input-only
    backward with ``split``, the weight work left for W. A full backward splits per
    part when ``split`` so its weight work fills the waits, and finishes it here."""
    forward = ForwardTask(module0, inputs0, waiter, label="F")
    backward = BackwardTask(record1, roots1, grads1, waiter, split=split, label="B")
    run_pair(forward, backward, fill_weight=not input_only)
    if split and not input_only:
        backward.weight.run()
    left = backward.weight if split and input_only else None
    return forward, _for_leaves(backward, leaves1), left
