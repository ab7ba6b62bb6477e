"""The executor: runs one rank's list of a schedule, step by step, through the dispatch
table; the one place where a failure on this rank is reported to the others."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from ..errors import ActionFailure, RemoteFailure
from ..schedules.actions import Action, Overlap
from ..schedules.schedule import Schedule
from ..transport.base import DRAIN_SECONDS, BaseTransport
from ..transport.protocol import Stamp
from .declared import Declared
from .extension import Extension
from .kernels import DEFAULT_KERNELS, Kernels
from .memory import MemoryProbe
from .plan import LOOKAHEAD, ExecutionPlan, build_plan
from .record import StepRecord
from .run import StepData, StepResult, StepRun
from .shapes import BoundaryShapes

__all__ = ["StepData", "StepResult", "Executor", "StepRecord", "DRAIN_SECONDS"]


class Executor:
    """Runs schedules on one rank.

    It keeps only configuration and caches (execution plans, and the boundary shapes of
    a static-shape pipeline); everything a step holds lives in the step's
    :class:`~dualpipe.runtime.run.StepRun` and is dropped when the step ends.

    Args:
        rank: this rank's pipeline rank.
        modules: the modules this rank holds, in the layout's ``rank_stages`` order.
        transport: point-to-point messaging.
        split_backward: run input-only backwards with the weight work truly deferred
            (False: an ``I`` runs a full backward and its ``W`` does nothing).
        static_shapes: boundary shapes never change: headers travel in the first step
            of each schedule only.
        lookahead: receives are posted this many actions ahead.
        kernels: the dispatch table (see :mod:`dualpipe.runtime.kernels`); default: the
            runtime's own, extended by ``extensions``.
        extensions: plug-ins whose kernels and step hooks this executor runs.
    """

    def __init__(
        self,
        rank: int,
        modules: Sequence[nn.Module],
        transport: BaseTransport,
        split_backward: bool = True,
        static_shapes: bool = False,
        lookahead: int = LOOKAHEAD,
        kernels: Kernels | None = None,
        extensions: Sequence[Extension] = (),
    ) -> None:
        self.rank = rank
        self.modules = list(modules)
        self.transport = transport
        self.split_backward = split_backward
        self.static_shapes = static_shapes
        self.declared: Declared | None = None  # the user's declared shapes/dtype, checked
        self.lookahead = lookahead
        self.extensions: list[Extension] = []
        self.kernels = kernels if kernels is not None else DEFAULT_KERNELS
        self.extend(extensions)
        self._plans: dict[tuple[Schedule, bool, bool], ExecutionPlan] = {}
        self._known: dict[tuple[Schedule, bool], BoundaryShapes] = {}
        # the original's overlapped_forward_backward receives output tensors, so stages
        # that define it keep them until their backward
        self.keep_outputs = any(
            hasattr(type(m), "overlapped_forward_backward") for m in self.modules
        )
        self.last_plan: ExecutionPlan | None = None
        self.last_record: StepRecord | None = None

    def extend(self, extensions: Sequence[Extension]) -> None:
        """Add plug-ins: their kernels go into the table, their hooks run from the next
        step on."""
        for ext in extensions:
            self.kernels = ext.kernels(self.kernels)
            self.extensions.append(ext)

    def plan(self, schedule: Schedule, training: bool, headers: bool) -> ExecutionPlan:
        """This rank's (cached) execution plan of ``schedule``."""
        key = (schedule, training, headers)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(schedule, self.rank, training, headers, self.lookahead)
            self._plans[key] = plan
        return plan

    def run(
        self, schedule: Schedule, data: StepData, step: int = 0, record: bool | str = False
    ) -> StepResult:
        """Execute this rank's list of ``schedule`` once, as step number ``step`` (every
        rank counts steps alike). On failure the step is abandoned (:meth:`abandon`).
        ``record``: keep a :class:`StepRecord` (True: with memory samples on CUDA;
        ``"memory"``: on CPU too)."""
        self.transport.begin_step(step)
        try:
            return self._run(schedule, data, step, record)
        except BaseException as exc:
            for ext in self.extensions:
                try:
                    ext.step_failed()
                except Exception:  # noqa: BLE001, S110 - the step failed already
                    pass
            self.abandon(exc)
            raise

    def refuse(self, step: int, exc: BaseException, what: str) -> None:
        """Step ``step`` cannot start on this rank (``exc``; ``what`` says why, e.g.
        "invalid step arguments"): tell the other ranks at once, naming this rank, and
        complete whatever of the step they posted."""
        self.transport.begin_step(step)
        self.transport.post_error(exc.failure if isinstance(exc, RemoteFailure)
                                  else f"rank {self.rank}: {what}: {exc}")
        self.abandon(exc)

    def _run(self, schedule: Schedule, data: StepData, number: int, record: bool | str
             ) -> StepResult:
        known = self._known.get((schedule, data.training)) if self.static_shapes else None
        plan = self.plan(schedule, data.training, headers=known is None)
        self.transport.check_error(fresh=True)  # a pipeline that failed before stays failed
        shapes = (
            known.copy()
            if known is not None
            else BoundaryShapes(static=self.static_shapes, declared=self.declared)
        )
        trace = StepRecord(time.perf_counter(), time.time()) if record else None
        stamp = Stamp(self.transport.pipeline, number, schedule.num_chunks, data.training,
                      self.static_shapes)
        run = StepRun(plan, data, self.modules, self.transport, shapes, self.split_backward,
                      self.keep_outputs, stamp, trace)
        self.last_plan, self.last_record = plan, trace
        for ext in self.extensions:
            self._guard(run, f"{ext.name}: before the step", partial(ext.step_plan, plan))
            self._guard(run, f"{ext.name}: before the step",
                        partial(ext.before_step, data.training))
        sample = record == "memory" or self.transport.device.type == "cuda"
        probe = self._probe(data) if trace is not None and sample else None
        steps = plan.steps
        with probe if probe is not None else nullcontext():
            for i, step in enumerate(steps):
                # 1. post what is due and wait for the step's inputs before its clock
                #    starts (a timeout or a disagreeing stamp is reported like a failing
                #    action)
                self._guard(run, step.label, partial(run.receive, step))
                # 2. compute (plug-ins' work around it, e.g. gathering parameters,
                #    included)
                t0 = time.perf_counter()
                for ext in self.extensions:
                    self._guard(run, step.label, partial(ext.before_action, step))
                self._guard(run, step.label, partial(self.kernels.run, run, step))
                following = steps[i + 1] if i + 1 < len(steps) else None
                for ext in self.extensions:
                    self._guard(run, step.label, partial(ext.after_action, step, following))
                if trace is not None:
                    t1 = time.perf_counter()
                    trace.steps.append((step.label, t0, t1))
                    if probe is not None:
                        trace.memory.append((t1, probe.held(self._buffers(run))))
                # 3. plug-ins' work after a module's last gradient work (e.g.
                #    reduce-scatter)
                for module in step.finishes:
                    for ext in self.extensions:
                        self._guard(run, step.label,
                                    partial(ext.after_stage_backward, module))
            run.mailbox.close()
            self.transport.drain_sends(f"rank {self.rank}: completion of its sends")
            self.transport.finish_step()
        for ext in self.extensions:
            self._guard(run, f"{ext.name}: after the step",
                        partial(ext.after_step, data.training))
        if self.static_shapes and known is None:
            self._known[(schedule, data.training)] = shapes
        result = run.result()
        if trace is not None and probe is not None:
            del run
            trace.memory.append((time.perf_counter(), probe.held()))
        return result

    def _buffers(self, run: StepRun) -> list[torch.Tensor]:
        """Message buffers and local hand-offs a recorded step leaves out of its memory."""
        out = run.mailbox.buffers()
        out.extend(self.transport.sends_in_flight())
        out.extend(t for ts in run.local.values() for t in ts)
        return out

    def _probe(self, data: StepData) -> MemoryProbe:
        """What samples the memory this rank holds in a recorded step."""
        batch = [t for mbs in (data.inputs or [], data.labels or []) for mb in mbs for t in mb]
        return MemoryProbe(self.modules, batch, self.transport.device)

    def _guard(self, run: StepRun, label: Action | Overlap | str,
               fn: Callable[[], None]) -> None:
        """Run ``fn``; an error of this rank is reported to every rank, naming this rank
        and what ran (``run.label`` when a kernel narrowed it, else ``label``)."""
        run.label = None
        try:
            fn()
        except (RemoteFailure, ActionFailure):
            raise  # another rank's failure, or one reported already
        except Exception as exc:
            what = run.label if run.label is not None else label
            message = (
                f"rank {self.rank} failed in {what} ({run.plan.schedule.name}): "
                f"{type(exc).__name__}: {exc}"
            )
            self.transport.post_error(message)
            raise ActionFailure(message) from exc

    def abandon(self, exc: BaseException) -> None:
        """Give up the current step after ``exc``: tell the other ranks (the transport
        keeps the first failure posted in a pipeline, so a failure already reported —
        or one that came from another rank — is not replaced) and complete every
        message of the step still open on either side, so nothing of it is left posted."""
        self.transport.post_error(
            exc.failure if isinstance(exc, RemoteFailure)  # another rank's: as posted
            else f"rank {self.rank} failed in step {self.transport.step}: "
            f"{type(exc).__name__}: {exc}"
        )
        self.transport.drain_failed_step(min(self.transport.timeout, DRAIN_SECONDS))
