"""The dispatch table (:class:`Kernels`): how each kind of step — ``F``, ``B``, ``I``, ``W``
and an overlapped pair — runs on a rank."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..autograd import backward_full, backward_input
from ..schedules.actions import Op
from .plan import ActionPlan, PlannedStep, Route, StepKind
from .run import StepRun

__all__ = ["ActionKernel", "PairKernel", "Kernels", "DEFAULT_KERNELS", "forward",
           "backward", "input_backward", "weight", "pair"]

ActionKernel = Callable[[StepRun, ActionPlan], None]
"""``kernel(run, a)``: runs one action on this rank."""

PairKernel = Callable[["Kernels", StepRun, ActionPlan, ActionPlan], None]
"""``pair(kernels, run, fwd, bwd)``: runs an overlapped forward and backward."""


def forward(run: StepRun, a: ActionPlan) -> None:
    """``F``: the stage's forward; outputs go on (or into the loss)."""
    inputs = run.forward_inputs(a)
    run.finish_forward(a, inputs, run.module(a)(*inputs), None)


def backward(run: StepRun, a: ActionPlan) -> None:
    """``B``: input and weight gradients in one pass."""
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    run.finish_backward(a, leaves, backward_full(roots, grads, leaves))


def input_backward(run: StepRun, a: ActionPlan) -> None:
    """``I``: input gradients now, the weight work kept for the matching ``W`` (a full
    backward when the split is off)."""
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    key = (a.action.phase, a.action.chunk)
    if run.split:
        in_grads, work = backward_input(roots, grads, leaves)
        run.deferred[key] = work
        run.finish_backward(a, leaves, in_grads)
        # the received inputs only the input side read: free them now, not at W
        work.release_unread_inputs()
    else:
        in_grads = backward_full(roots, grads, leaves)
        run.deferred[key] = None
        run.finish_backward(a, leaves, in_grads)


def weight(run: StepRun, a: ActionPlan) -> None:
    """``W``: the weight work deferred by the matching ``I``."""
    work = run.deferred.pop((a.action.phase, a.action.chunk), None)
    if work is not None:
        work.run()


def pair(kernels: Kernels, run: StepRun, first: ActionPlan, second: ActionPlan) -> None:
    """A pair (``F+B``, ``F+F``, ``B+B``...): for ``F+B``, the stage's
    ``overlapped_forward_backward`` when its class defines one (and the backward is a
    full ``B``); otherwise the first action, then the second, each through the table and
    named in errors by its own action (plug-ins interleave their parts)."""
    fb = getattr(type(run.module(first)), "overlapped_forward_backward", None)
    if fb is None or first.action.op is not Op.FORWARD or second.action.op is not Op.BACKWARD:
        for a in (first, second):
            run.label = a.action
            kernels.action(a.action.op)(run, a)
        return
    _overlapped(run, fb, first, second)


def _overlapped(run: StepRun, fb: Callable[..., Any], fwd: ActionPlan, bwd: ActionPlan) -> None:
    """The original DualPipe's hook: ``fb(module0, inputs0, criterion0, labels0, module1,
    loss1, outputs1, output_grads1) -> (outputs0, loss0)``."""
    inputs0 = run.forward_inputs(fwd)
    grads1 = run.output_grads(bwd)
    roots1, leaves1 = run.pop_saved(bwd)
    last0, last1 = fwd.sink is Route.LOSS, bwd.source is Route.LOSS
    for leaf in leaves1:
        leaf.grad = None
    # the original's conventions: [] for the labels of a forward without a loss and for
    # the outputs and gradients of a backward that starts from the loss
    out0, loss0 = fb(
        run.module(fwd),
        list(inputs0),
        run.data.criterion if last0 else None,
        list(run.labels(fwd)) if last0 else [],
        run.module(bwd),
        roots1[0] if last1 else None,
        [] if last1 else list(roots1),
        [] if last1 else list(grads1),
    )
    in_grads: list[torch.Tensor | None] = [leaf.grad for leaf in leaves1]
    for leaf in leaves1:
        leaf.grad = None
    run.finish_forward(fwd, inputs0, out0, loss0)
    run.finish_backward(bwd, leaves1, in_grads)


@dataclass(frozen=True)
class Kernels:
    """What runs each kind of step (the executor's dispatch table)."""

    forward: ActionKernel
    backward: ActionKernel
    input: ActionKernel
    weight: ActionKernel
    pair: PairKernel

    def action(self, op: Op) -> ActionKernel:
        """The kernel of a single action of ``op``."""
        return {Op.FORWARD: self.forward, Op.BACKWARD: self.backward, Op.INPUT: self.input,
                Op.WEIGHT: self.weight}[op]

    def replace(self, **changes: Any) -> Kernels:
        """A copy with some entries replaced (``forward=...``, ``pair=...``)."""
        return dataclasses.replace(self, **changes)

    def run(self, run: StepRun, step: PlannedStep) -> None:
        """Run one planned step."""
        if step.kind is StepKind.PAIR:
            first, second = step.actions
            self.pair(self, run, first, second)
        else:
            (a,) = step.actions
            self.action(a.action.op)(run, a)


DEFAULT_KERNELS = Kernels(forward, backward, input_backward, weight, pair)
"""The runtime's own kernels (plug-ins extend them per pipeline)."""
