"""The overlap engine: a parted stage's forward and backward run part by part, and an
F&B pair runs by interleaving one micro-batch's forward parts with the other's backward
parts on one thread, each communication waited for only when its next part needs it."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..autograd import WeightGradWork, backward_full, backward_input
from ..errors import StepTimeout
from ..runtime.record import PartEvent
from .asynccomm import AsyncComm, InFlight
from .parted import PartedStage, reply, split_yield

__all__ = [
    "PartEvent",
    "Waiter",
    "ForwardTask",
    "BackwardTask",
    "WeightWorks",
    "run_forward",
    "run_backward",
    "run_pair",
    "run_interleaved",
    "Task",
]


class Waiter:
    """How the engine waits for a communication: runs filler work meanwhile, calls
    ``check`` (which may raise, e.g. when another rank failed) and gives up after
    ``timeout`` seconds. ``events``, when a list, receives :class:`PartEvent` records.

    With no filler work left, it blocks on the communication's completion
    (:meth:`InFlight.settle`: no CPU while blocked), waking at least every
    :attr:`check_period` seconds to call ``check``; an untimed communication (no futures
    to block on) is polled with naps of 20-200 us instead."""

    check_period = 0.01
    """Seconds between two calls of ``check`` while blocked on a communication."""

    _block = True
    """For benchmarks only (``benchmarks/bench_profile.py --overlap``), not a setting:
    False polls every communication with naps, as the waiter did before it blocked on
    the futures, so the two can be measured side by side."""

    def __init__(
        self,
        timeout: float = 120.0,
        check: Callable[[], None] | None = None,
        events: list[PartEvent] | None = None,
    ) -> None:
        self.timeout = timeout
        self.check = check
        self.events = events

    def log(self, label: str, kind: str, start: float, end: float | None) -> None:
        """Record an interval in :attr:`events` (when a list); ``end=None``: the interval's
        end is unknown (an untimed communication) and nothing is recorded."""
        if self.events is not None and end is not None:
            self.events.append(PartEvent(label, kind, start, end))

    def wait(self, pending: InFlight, what: str,
             filler: Callable[[], bool] | None = None) -> tuple[Tensor, ...]:
        """The result of ``pending``; while it is not ready, run ``filler`` (which returns
        whether it did something) or block (see the class)."""
        if not pending.ready():
            t0 = time.perf_counter()
            deadline = t0 + self.timeout
            nap = 2e-5
            while not pending.ready():
                if filler is not None and filler():
                    continue
                if self.check is not None:
                    self.check()
                now = time.perf_counter()
                if now > deadline:
                    raise StepTimeout(f"{what} did not complete within {self.timeout:.0f} s")
                if not (self._block and pending.settle(min(self.check_period,
                                                           deadline - now))):
                    time.sleep(nap)
                    nap = min(nap * 2, 2e-4)
            self.log(what, "wait", t0, time.perf_counter())
        return pending.wait()


def _completed(pending: InFlight) -> float | None:
    """When ``pending`` (waited for) completed, as its handles' futures reported it;
    ``None`` for an untimed one (``InFlight(..., timed=False)``): its interval is not
    recorded rather than ended when the engine happened to look."""
    return pending.completed_at


def _leaf(t: Any, grad: bool) -> Any:
    if not isinstance(t, Tensor):
        return t
    return t.detach().requires_grad_(grad and t.requires_grad)


def _tensors(values: Sequence[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor)]


@dataclass
class _Segment:
    """A computation part's record: its input leaves and its outputs' places in the graph
    (``("graph", edge)``, ``("pass", leaf index)`` or ``("none", None)``)."""

    leaves: list[Tensor]
    outs: list[tuple[str, Any]]


@dataclass
class _Boundary:
    """A communication between two computation parts."""

    op: AsyncComm
    ctx: dict[str, Any]  # the call's options and what its launch kept for the backward
    n_inputs: int
    n_carried: int  # carried tensors after its results among the next part's leaves
    grad: bool  # whether its inputs needed gradients (then its backward runs)


def _place(t: Tensor, leaves: list[Tensor], keep: bool = False) -> tuple[str, Any]:
    """Where a part's output sits: one of its leaves, or a place in its graph (only the
    gradient edge is kept unless ``keep``, so the tensor itself can be freed)."""
    for i, leaf in enumerate(leaves):
        if t is leaf:
            return ("pass", i)
    if t.requires_grad:
        return ("graph", t if keep else get_gradient_edge(t))
    return ("none", None)


def _one_part(module: nn.Module, inputs: tuple[Any, ...]) -> Generator[Any, Any, Any]:
    """An ordinary module as a stage of one computation part."""
    return module(*inputs)
    yield  # a generator function


class ForwardTask:
    """The forward of one micro-batch through a :class:`PartedStage` (or an ordinary
    module: one computation part), one part per :meth:`step`. After it is :attr:`done`,
    :attr:`outputs` is what ``parts`` returned and the task is the record its
    :class:`BackwardTask` needs (under grad mode)."""

    def __init__(self, stage: nn.Module, inputs: Sequence[Any], waiter: Waiter,
                 label: str = "F") -> None:
        self.grad = torch.is_grad_enabled()
        self.inputs = tuple(
            t if not isinstance(t, Tensor) or (t.grad_fn is None and (self.grad or
                                                                     not t.requires_grad))
            else _leaf(t, self.grad)
            for t in inputs
        )
        self.waiter = waiter
        self.label = label
        self.segments: list[_Segment] = []
        self.boundaries: list[_Boundary] = []
        self.done = False
        self.outputs: Any = None
        self._gen = (stage.parts(*self.inputs) if isinstance(stage, PartedStage)
                     else _one_part(stage, self.inputs))
        if not isinstance(self._gen, Generator):
            raise TypeError(f"{type(stage).__name__}.parts must be a generator (use yield)")
        self._stage = stage
        self._started = False
        self._leaves = _tensors(self.inputs)
        self._pending: InFlight | None = None
        self._yielded: Any = None
        self._carried: tuple[Any, ...] = ()
        self._launched = 0.0

    def ready(self) -> bool:
        """Whether :meth:`step` would run without waiting on a communication."""
        return self._pending is None or self._pending.ready()

    def step(self, filler: Callable[[], bool] | None = None) -> None:
        """Run the next computation part (waiting for the communication before it) and
        launch the communication after it."""
        n = len(self.boundaries)  # this part's number
        value: Any = None
        if self._pending is not None:
            what = f"{self.label} comm {n - 1}"
            results = self.waiter.wait(self._pending, what, filler)
            self.waiter.log(what, "comm", self._launched, _completed(self._pending))
            needs = self.grad and self.boundaries[-1].grad
            res = tuple(r.detach().requires_grad_(needs and r.is_floating_point())
                        for r in results)
            carried = tuple(_leaf(c, self.grad) for c in self._carried)
            value = reply(self._yielded, res, carried)
            self._leaves = [*res, *_tensors(carried)]
            self._pending, self._yielded, self._carried = None, None, ()
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(self.grad):
                yielded = self._gen.send(value) if self._started else next(self._gen)
        except StopIteration as stop:
            self.waiter.log(f"{self.label} part {n}", "compute", t0, time.perf_counter())
            self.outputs = stop.value
            if self.grad:
                self.segments.append(_Segment(self._leaves, []))
            self.done = True
            return
        self._started = True
        call, carried = split_yield(yielded, self._stage)
        outs = [*call.inputs, *_tensors(carried)]
        needs = self.grad and any(t.requires_grad for t in call.inputs)
        if self.grad:
            self.segments.append(_Segment(self._leaves, [_place(t, self._leaves) for t in outs]))
        self.waiter.log(f"{self.label} part {n}", "compute", t0, time.perf_counter())
        self._launched = time.perf_counter()
        self._pending = call.op.launch(tuple(t.detach() for t in call.inputs), call.ctx)
        self.boundaries.append(_Boundary(call.op, call.ctx, len(call.inputs),
                                         len(_tensors(carried)), needs))
        self._yielded, self._carried = yielded, carried

    def finish(self, filler: Callable[[], bool] | None = None) -> Any:
        """Run the remaining parts; the stage's outputs."""
        while not self.done:
            self.step(filler)
        return self.outputs


class WeightWorks:
    """The deferred weight-gradient work of a parted backward, one item per part."""

    def __init__(self) -> None:
        self.items: list[WeightGradWork] = []

    def run_one(self) -> bool:
        """Run the oldest pending item; whether there was one."""
        if not self.items:
            return False
        self.items.pop(0).run()
        return True

    def run(self) -> None:
        """Run every pending item (what a ``W`` action does)."""
        while self.run_one():
            pass


class BackwardTask:
    """The backward of one micro-batch through a parted stage, from its
    :class:`ForwardTask`, one computation part per :meth:`step` (last part first).

    Args:
        record: the finished forward (run under grad mode).
        roots: what the last part's backward starts from (the outputs, or the loss).
        grads: their gradients (``None``: implicit for a scalar loss).
        split: input-only backward per part, the weight-gradient work kept in
            :attr:`weight` (else each part's full backward).
    """

    def __init__(self, record: ForwardTask, roots: Sequence[Tensor | GradientEdge],
                 grads: Sequence[Tensor | None], waiter: Waiter, split: bool = True,
                 label: str = "B") -> None:
        if not record.done or not record.grad:
            raise RuntimeError("a parted backward needs a finished forward run under grad mode")
        self.record = record
        self.waiter = waiter
        self.split = split
        self.label = label
        self.weight = WeightWorks()
        self.done = False
        self.input_grads: list[Tensor | None] = []
        self._k = len(record.segments) - 1
        last = record.segments[-1]
        last.outs = [_root_place(r, last.leaves) for r in roots]
        self._grads: list[Tensor | None] = list(grads)
        self._pending: InFlight | None = None
        self._carried_grads: list[Tensor | None] = []
        self._launched = 0.0

    def ready(self) -> bool:
        """Whether :meth:`step` would run without waiting on a communication."""
        return self._pending is None or self._pending.ready()

    def step(self, filler: Callable[[], bool] | None = None) -> None:
        """Run the next part's backward (waiting for the gradient communication before
        it) and launch the communication of the gradients it produces."""
        k = self._k
        seg = self.record.segments[k]
        if self._pending is not None:
            what = f"{self.label} comm {k + 1}"  # launched after part k + 1's backward
            comm_grads = self.waiter.wait(self._pending, what, filler)
            self.waiter.log(what, "comm", self._launched, _completed(self._pending))
            self._grads = [*comm_grads, *self._carried_grads]
            self._pending = None
        t0 = time.perf_counter()
        roots: list[Tensor | GradientEdge] = []
        grads: list[Tensor | None] = []
        passed: list[tuple[int, Tensor]] = []
        last = k == len(self.record.segments) - 1
        for (kind, where), g in zip(seg.outs, self._grads, strict=True):
            # the last part's roots are the caller's (None: implicit for a scalar loss);
            # elsewhere None means no gradient reached that output
            if kind == "graph" and (g is not None or last):
                roots.append(where)
                grads.append(g)
            elif kind == "pass" and g is not None:
                passed.append((where, g))
        if self.split:
            in_grads, work = backward_input(roots, grads, seg.leaves)
            self.weight.items.append(work)
        else:
            in_grads = backward_full(roots, grads, seg.leaves)
        for i, g in passed:
            old = in_grads[i]
            in_grads[i] = g if old is None else old + g
        self.waiter.log(f"{self.label} part {k}", "compute", t0, time.perf_counter())
        self.record.segments[k] = _Segment([], [])  # this part's graph is no longer needed
        if k == 0:
            self.input_grads = list(in_grads)
            self.done = True
            return
        boundary = self.record.boundaries[k - 1]
        n_res = len(seg.leaves) - boundary.n_carried
        self._carried_grads = list(in_grads[n_res:])
        if boundary.grad:
            res_grads = tuple(
                g if g is not None else torch.zeros_like(leaf)
                for g, leaf in zip(in_grads[:n_res], seg.leaves[:n_res], strict=True)
            )
            self._launched = time.perf_counter()
            self._pending = boundary.op.launch_backward(res_grads, boundary.ctx)
        else:  # nothing needed a gradient through this communication: no backward
            nothing: list[Tensor | None] = [None] * boundary.n_inputs
            self._grads = nothing + self._carried_grads
        self._k = k - 1

    def finish(self, filler: Callable[[], bool] | None = None) -> list[Tensor | None]:
        """Run the remaining parts; the gradients of the forward's tensor inputs, in order
        (``None`` where none reached or the input needs none)."""
        while not self.done:
            self.step(filler)
        return self.input_grads


def _root_place(root: Tensor | GradientEdge, leaves: list[Tensor]) -> tuple[str, Any]:
    if isinstance(root, Tensor):
        return _place(root, leaves, keep=True)  # a scalar loss may come without a gradient
    for i, leaf in enumerate(leaves):
        if leaf.requires_grad and root.node is get_gradient_edge(leaf).node:
            return ("pass", i)
    return ("graph", root)

def run_forward(stage: PartedStage, inputs: Sequence[Any],
                waiter: Waiter | None = None) -> ForwardTask:
    """A parted stage's forward of one micro-batch, part by part; the finished task
    (``.outputs``; the record for :func:`run_backward` under grad mode)."""
    task = ForwardTask(stage, inputs, waiter if waiter is not None else Waiter())
    task.finish()
    return task


def run_backward(record: ForwardTask, roots: Sequence[Tensor | GradientEdge],
                 grads: Sequence[Tensor | None], waiter: Waiter | None = None,
                 split: bool = False) -> BackwardTask:
    """A parted stage's backward of one micro-batch, part by part (last part first); the
    finished task (``.input_grads``; with ``split``, ``.weight`` holds each part's
    deferred weight-gradient work, else the parameters' gradients are accumulated)."""
    task = BackwardTask(record, roots, grads, waiter if waiter is not None else Waiter(),
                        split)
    task.finish()
    return task


Task = ForwardTask | BackwardTask
"""One micro-batch's forward or backward through a stage, part by part."""


def run_interleaved(tasks: Sequence[Task], filler: Callable[[], bool] | None = None) -> None:
    """Run ``tasks`` (one micro-batch each) on one thread, one part of each unfinished
    task in turn, in the order given: each part launches its communication and waits
    for one only before that micro-batch's next part; while a wait would block,
    ``filler`` runs (e.g. deferred weight-gradient work).

    The launch order of communications depends on the stages' structure only, so it is
    the same on every rank of a group (as collectives require)."""
    while not all(t.done for t in tasks):
        for task in tasks:
            if not task.done:
                task.step(filler)


def run_pair(forward: ForwardTask, backward: BackwardTask, fill_weight: bool = True) -> None:
    """Run an F&B pair: :func:`run_interleaved` of the backward, then the forward (the
    order of DeepSeek's overlap). While a wait would block, the backward's deferred
    weight-gradient work (``split`` backwards) runs instead when ``fill_weight``."""
    waiter = backward.waiter

    def fill() -> bool:
        t0 = time.perf_counter()
        if not backward.weight.run_one():
            return False
        waiter.log(f"{backward.label} weight", "weight", t0, time.perf_counter())
        return True

    run_interleaved((backward, forward), fill if fill_weight else None)
