"""The executor: runs one rank's list of a schedule, step by step, through the
handler table.

It keeps only configuration and caches (execution plans, and the boundary shapes
of a static-shape pipeline); everything a step holds lives in the step's
:class:`~dualpipe.runtime.run.StepRun` and is dropped when the step ends.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial

from torch import nn

from ..schedules.actions import Op
from ..schedules.schedule import Schedule
from .declared import Declared
from .errors import RemoteFailure
from .extension import Extension
from .handlers import DEFAULT_HANDLERS, Handler
from .p2p import BaseTransport
from .plan import LOOKAHEAD, ExecutionPlan, build_plan
from .protocol import Stamp
from .record import StepRecord
from .run import ActionFailure, StepData, StepResult, StepRun
from .shapes import BoundaryShapes

__all__ = ["StepData", "StepResult", "Executor", "StepRecord", "DRAIN_SECONDS",
           "last_backward_steps"]

DRAIN_SECONDS = 30.0
"""At most this long, after a failure, for the ranks to complete the step's open messages."""


def last_backward_steps(plan: ExecutionPlan) -> dict[int, list[int]]:
    """[extension hooks] For each step of ``plan`` (by position) the modules whose last
    backward or weight-gradient action (``B``, ``I`` or ``W``) of the step it runs."""
    last: dict[int, int] = {}
    for i, step in enumerate(plan.steps):
        for a in step.actions:
            if a.action.op is not Op.FORWARD:
                last[a.module] = i
    out: dict[int, list[int]] = {}
    for module, i in sorted(last.items()):
        out.setdefault(i, []).append(module)
    return out


class Executor:
    """Runs schedules on one rank.

    Args:
        rank: this rank's pipeline rank.
        modules: the modules this rank holds, in the layout's ``rank_stages`` order.
        transport: point-to-point messaging.
        split_backward: run input-only backwards with the weight work truly deferred
            (False: an ``I`` runs a full backward and its ``W`` does nothing).
        static_shapes: boundary shapes never change: headers travel in the first step
            of each schedule only.
        lookahead: receives are posted this many actions ahead.
        handlers: the dispatch table (see :mod:`dualpipe.runtime.handlers`).
    """

    def __init__(
        self,
        rank: int,
        modules: Sequence[nn.Module],
        transport: BaseTransport,
        split_backward: bool = True,
        static_shapes: bool = False,
        lookahead: int = LOOKAHEAD,
        handlers: Mapping[str, Handler] | None = None,
    ) -> None:
        self.rank = rank
        self.modules = list(modules)
        self.transport = transport
        self.split = split_backward
        self.static_shapes = static_shapes
        self.declared: Declared | None = None  # the user's declared shapes/dtype, checked
        self.lookahead = lookahead
        self.handlers = dict(handlers if handlers is not None else DEFAULT_HANDLERS)
        self._plans: dict[tuple[Schedule, bool, bool], ExecutionPlan] = {}
        self._known: dict[tuple[Schedule, bool], BoundaryShapes] = {}
        # the original's overlapped_forward_backward receives output tensors, so stages
        # that define it keep them until their backward
        self.keep_outputs = any(
            hasattr(type(m), "overlapped_forward_backward") for m in self.modules
        )
        self.last_plan: ExecutionPlan | None = None
        self.last_record: StepRecord | None = None
        # [extension hooks] set by the pipeline (see runtime/extension.py)
        self.extensions: list[Extension] = []

    def plan(self, schedule: Schedule, training: bool, headers: bool) -> ExecutionPlan:
        """This rank's (cached) execution plan of ``schedule``."""
        key = (schedule, training, headers)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(schedule, self.rank, training, headers, self.lookahead)
            self._plans[key] = plan
        return plan

    def run(
        self, schedule: Schedule, data: StepData, step: int = 0, record: bool = False
    ) -> StepResult:
        """Execute this rank's list of ``schedule`` once, as step number ``step`` (every
        rank counts steps alike). On failure the step is abandoned (:meth:`abandon`)."""
        self.transport.begin_step(step)
        try:
            return self._run(schedule, data, step, record)
        except BaseException as exc:
            self.abandon(exc)
            raise

    def _run(self, schedule: Schedule, data: StepData, number: int, record: bool
             ) -> StepResult:
        known = self._known.get((schedule, data.training)) if self.static_shapes else None
        plan = self.plan(schedule, data.training, headers=known is None)
        self.transport.check_error()  # a pipeline that failed before stays failed
        shapes = (
            known.copy()
            if known is not None
            else BoundaryShapes(static=self.static_shapes, declared=self.declared)
        )
        trace = StepRecord(time.perf_counter(), time.time()) if record else None
        stamp = Stamp(self.transport.pipeline, number, schedule.num_chunks, data.training,
                      self.static_shapes)
        run = StepRun(plan, data, self.modules, self.transport, shapes, self.handlers,
                      self.split, self.keep_outputs, stamp, trace)
        self.last_plan, self.last_record = plan, trace
        # [extension hooks] which modules finish their backward work at which step
        finishing = last_backward_steps(plan) if self.extensions and data.training else {}
        for i, step in enumerate(plan.steps):
            # post what is due and wait for the step's inputs before its timed compute
            # (a timeout or a disagreeing stamp is reported like a failing action)
            run.guard(step.label, partial(run.receive, step))
            t0 = time.perf_counter()
            run.guard(step.label, partial(self.handlers[step.kind], run, step))
            if trace is not None:
                trace.steps.append((step.label, t0, time.perf_counter()))
            for module in finishing.get(i, ()):  # [extension hooks] (not in the action's time)
                for ext in self.extensions:
                    run.guard(step.label, partial(ext.after_stage_backward, module))
        run.mailbox.close()
        self.transport.drain_sends(f"rank {self.rank}: completion of its sends")
        if self.static_shapes and known is None:
            self._known[(schedule, data.training)] = shapes
        return run.result()

    def abandon(self, exc: BaseException) -> None:
        """Give up the current step after ``exc``: tell the other ranks (unless they told
        us, or the failing action did already) and complete every message of the step
        still open on either side, so nothing of it is left posted."""
        if not isinstance(exc, (RemoteFailure, ActionFailure)):
            self.transport.post_error(
                f"rank {self.rank} failed in step {self.transport.step}: "
                f"{type(exc).__name__}: {exc}"
            )
        self.transport.drain_failed_step(min(self.transport.timeout, DRAIN_SECONDS))
