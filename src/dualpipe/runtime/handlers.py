"""How each kind of step runs: the executor's dispatch table.

A **handler** is a function ``handler(run, step) -> None``:

* ``run`` is the :class:`~dualpipe.runtime.run.StepRun` of the current step on this
  rank. It offers the primitives an action is built from: ``run.module(a)``,
  ``run.forward_inputs(a)``, ``run.finish_forward(a, inputs, outputs, loss)``,
  ``run.output_grads(a)``, ``run.pop_saved(a)``, ``run.finish_backward(a, leaves,
  input_grads)``, ``run.labels(a)``, ``run.data`` (criterion, training...),
  ``run.deferred`` (weight work of input-only backwards, keyed by ``(phase, chunk)``)
  and ``run.run_action(a)`` (run one action through its own handler, errors named
  after it).
* ``step`` is a :class:`~dualpipe.runtime.plan.PlannedStep`: ``step.kind`` (the
  table key), ``step.label`` (what errors and timelines print) and ``step.actions``
  (one :class:`~dualpipe.runtime.plan.ActionPlan`, or forward then backward for a
  pair), each stating where its inputs come from and its outputs go.

When a handler is called, every message the step needs has arrived (the executor
waited before starting the step's clock), so a handler only computes; sends are
posted by ``finish_forward`` / ``finish_backward``. An exception from a handler is
reported to every rank as ``rank R failed in <label>``.

Keys: ``"F"``, ``"B"``, ``"I"``, ``"W"`` and ``"FB"`` (an overlapped pair). Pass
``handlers={**DEFAULT_HANDLERS, "FB": my_pair}`` to
:class:`~dualpipe.runtime.executor.Executor` to replace one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..autograd import backward_full, backward_input
from ..overlap.handlers import with_parts
from ..schedules.actions import Op
from .plan import ActionPlan, PlannedStep, Route

if TYPE_CHECKING:
    from .run import StepRun

__all__ = ["Handler", "DEFAULT_HANDLERS", "run_forward", "run_backward", "run_input",
           "run_weight", "run_pair"]

Handler = Callable[["StepRun", "PlannedStep"], None]
"""``handler(run, step)``: runs one planned step on this rank."""


def run_forward(run: StepRun, step: PlannedStep) -> None:
    """``F``: the stage's forward; outputs go on (or into the loss)."""
    (a,) = step.actions
    inputs = run.forward_inputs(a)
    run.finish_forward(a, inputs, run.module(a)(*inputs), None)


def run_backward(run: StepRun, step: PlannedStep) -> None:
    """``B``: input and weight gradients in one pass."""
    (a,) = step.actions
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    run.finish_backward(a, leaves, backward_full(roots, grads, leaves))


def run_input(run: StepRun, step: PlannedStep) -> None:
    """``I``: input gradients now, the weight work kept for the matching ``W`` (a full
    backward when the split is off)."""
    (a,) = step.actions
    grads = run.output_grads(a)
    roots, leaves = run.pop_saved(a)
    key = (a.action.phase, a.action.chunk)
    if run.split:
        in_grads, work = backward_input(roots, grads, leaves)
        run.deferred[key] = work
    else:
        in_grads = backward_full(roots, grads, leaves)
        run.deferred[key] = None
    run.finish_backward(a, leaves, in_grads)


def run_weight(run: StepRun, step: PlannedStep) -> None:
    """``W``: the weight work deferred by the matching ``I``."""
    (a,) = step.actions
    work = run.deferred.pop((a.action.phase, a.action.chunk), None)
    if work is not None:
        work.run()


def run_pair(run: StepRun, step: PlannedStep) -> None:
    """``F+B``: the stage's ``overlapped_forward_backward`` when its class defines one
    (and the backward is a full ``B``); otherwise the forward, then the backward."""
    fwd, bwd = step.actions
    fb = getattr(type(run.module(fwd)), "overlapped_forward_backward", None)
    if fb is None or bwd.action.op is not Op.BACKWARD:
        run.run_action(fwd)
        run.run_action(bwd)
        return
    _overlapped(run, fb, fwd, bwd)


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


DEFAULT_HANDLERS: dict[str, Handler] = with_parts({
    Op.FORWARD.value: run_forward,
    Op.BACKWARD.value: run_backward,
    Op.INPUT.value: run_input,
    Op.WEIGHT.value: run_weight,
    "FB": run_pair,
})
"""The handler of each step kind; stages written as parts
(:class:`~dualpipe.overlap.PartedStage`) run part by part and their pairs interleave
(:func:`dualpipe.overlap.handlers.with_parts`)."""
