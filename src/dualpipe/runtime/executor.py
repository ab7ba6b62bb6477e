"""The executor: runs one rank's list of a schedule for one training or inference step.

It reads the same per-rank action lists as the simulator, with communication
derived by :func:`dualpipe.schedules.comm.plan_communication`. For each action in
order it makes sure the messages the action needs have arrived (receives are
posted a few actions ahead, in the sender's order), runs the action, and posts
the action's sends at once without waiting for them.

State per step, keyed by ``(phase, chunk)``: the stage's detached input leaves
and its output roots (kept until the backward), and the deferred weight-gradient
work of input-only backwards (kept until the matching ``W``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from ..overlap.engine import ForwardTask, PartEvent, Waiter, WeightWorks
from ..overlap.handlers import is_parted, parted_backward, parted_forward, parted_pair
from ..schedules.actions import Action, Op, Overlap
from ..schedules.comm import Message, RankPlan, plan_communication
from ..schedules.schedule import Schedule
from .p2p import (
    HEADER_LEN,
    Pending,
    PipelineError,
    RemoteFailure,
    TensorMeta,
    Transport,
    decode_header,
    encode_header,
)
from .split_backward import WeightGradWork, backward_full, backward_input

__all__ = ["StepData", "StepResult", "Executor", "StepRecord"]

LOOKAHEAD = 4
"""Receives are posted for the next this-many actions."""


@dataclass
class StepData:
    """This rank's part of a step's data.

    Attributes:
        inputs: per micro-batch, the inputs of the stream that starts on this rank
            (``None`` entries are passed to the first stage as they are).
        labels: per micro-batch, the labels of the stream that ends on this rank.
        criterion: ``criterion(*outputs, *labels) -> scalar loss``.
        return_outputs: keep the last stage's outputs.
        training: run backwards (False: forward-only inference).
    """

    inputs: list[tuple[torch.Tensor | None, ...]] | None
    labels: list[tuple[torch.Tensor | None, ...]] | None
    criterion: Callable[..., torch.Tensor] | None
    return_outputs: bool
    training: bool


@dataclass
class StepResult:
    """What a step leaves on this rank: per-micro-batch losses and outputs of the
    stream that ends here (empty elsewhere)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    outputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


@dataclass
class StepRecord:
    """Measured timeline of one step on this rank (``time.perf_counter`` seconds;
    ``origin`` is the step's start and ``wall`` the same instant in ``time.time``).

    ``steps`` holds ``(step, start, end)`` for every executed step (actions or pairs),
    ``waits`` holds ``(label, start, end)`` for the time spent blocked on receives,
    ``parts`` the part-level events of stages written as parts (computation parts,
    communications in flight, waits on them, weight work filling them).
    """

    origin: float
    wall: float
    steps: list[tuple[Action | Overlap, float, float]] = field(default_factory=list)
    waits: list[tuple[str, float, float]] = field(default_factory=list)
    parts: list[PartEvent] = field(default_factory=list)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise PipelineError(
        f"a stage must return a tensor or a tuple of tensors, got {type(out).__name__}"
    )


class Executor:
    """Runs schedules on one rank.

    Args:
        rank: this rank's pipeline rank.
        modules: the modules this rank holds, in the layout's ``rank_stages`` order.
        transport: point-to-point messaging.
        split_backward: run input-only backwards with the weight work truly deferred
            (False: an ``I`` runs a full backward and its ``W`` does nothing).
    """

    def __init__(
        self,
        rank: int,
        modules: Sequence[nn.Module],
        transport: Transport,
        split_backward: bool = True,
        static_shapes: bool = False,
        lookahead: int = LOOKAHEAD,
    ) -> None:
        self.rank = rank
        self.modules = list(modules)
        self.transport = transport
        self.split = split_backward
        self.static_shapes = static_shapes
        self.lookahead = lookahead
        self._plans: dict[tuple[Schedule, bool, bool], tuple[RankPlan, dict[Message, int]]] = {}
        self._known: dict[tuple[Schedule, bool], tuple[dict, dict]] = {}
        self.record: StepRecord | None = None
        # the original's overlapped_forward_backward receives output tensors, so stages
        # that define it keep them until their backward
        self.keep_outputs = any(
            hasattr(type(m), "overlapped_forward_backward") for m in self.modules
        )

    # ------------------------------------------------------------------ planning
    def _plan(
        self, schedule: Schedule, forward_only: bool, headers: bool
    ) -> tuple[RankPlan, dict[Message, int]]:
        key = (schedule, forward_only, headers)
        if key not in self._plans:
            plan = plan_communication(schedule, forward_only, headers)[self.rank]
            need = {m: i for i, msgs in enumerate(plan.recvs) for m in msgs}
            self._plans[key] = (plan, need)
        return self._plans[key]

    # ------------------------------------------------------------------ step
    def run(self, schedule: Schedule, data: StepData, record: bool = False) -> StepResult:
        """Execute this rank's list of ``schedule`` once."""
        known = self._known.get((schedule, not data.training)) if self.static_shapes else None
        plan, need = self._plan(schedule, not data.training, headers=known is None)
        self.transport.check_error()  # a pipeline that failed before stays failed
        self.layout = schedule.layout
        self.schedule = schedule
        self.data = data
        self.plan = plan
        self.need = need
        self.result = StepResult()
        self.saved: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.deferred: dict[tuple[int, int], WeightGradWork | WeightWorks | None] = {}
        self.records: dict[tuple[int, int], ForwardTask] = {}  # parted stages' forwards
        self.local: dict[tuple[bool, int, int, int], list[torch.Tensor]] = {}
        self.arrived: dict[Message, list[torch.Tensor]] = {}
        self.pending: dict[Message, tuple[Pending, list[torch.Tensor]]] = {}
        self.posted_upto = {src: 0 for src in plan.incoming}
        self.metas: dict[tuple[int, int], list[TensorMeta]] = dict(known[0]) if known else {}
        self.sent_metas: dict[tuple[int, int], list[TensorMeta]] = (
            dict(known[1]) if known else {}
        )
        self.record = StepRecord(time.perf_counter(), time.time()) if record else None
        losses: dict[int, torch.Tensor] = {}
        outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._losses, self._outputs = losses, outputs

        actions = plan.actions
        i = 0
        while i < len(actions):
            self._post_receives(i + self.lookahead)
            partner = plan.pair_of[i]
            if partner == i + 1:
                self._run_pair(i)
                i += 2
            else:
                # wait for inputs before the timed compute; a timeout is reported too
                self._guarded(actions[i], lambda i=i: self._receive(i))
                t0 = time.perf_counter()
                self._guarded(actions[i], lambda i=i: self._run_one(i))
                if self.record is not None:
                    self.record.steps.append((actions[i], t0, time.perf_counter()))
                i += 1
        self.transport.drain_sends(f"rank {self.rank}: completion of its sends")
        if self.static_shapes and known is None:
            self._known[(schedule, not data.training)] = (self.metas, self.sent_metas)
        self.result.losses = [losses[k] for k in sorted(losses)]
        self.result.outputs = [outputs[k] for k in sorted(outputs)]
        # drop references so activations are freed between steps
        self.saved = {}
        self.records = {}
        self.local = {}
        self.arrived = {}
        leftover = [k for k, v in self.deferred.items() if v is not None]
        self.deferred = {}
        if leftover:
            raise PipelineError(f"rank {self.rank}: weight gradients never run for {leftover}")
        return self.result

    def _guarded(self, action: Action | Overlap, fn: Callable[[], None]) -> None:
        try:
            fn()
        except RemoteFailure:
            raise
        except Exception as exc:
            message = (
                f"rank {self.rank} failed in {action} ({self.schedule.name}): "
                f"{type(exc).__name__}: {exc}"
            )
            self.transport.post_error(message)
            raise PipelineError(message) from exc

    # ------------------------------------------------------------------ receives
    def _buffers_for(self, msg: Message) -> list[torch.Tensor] | None:
        """Allocate receive buffers for ``msg``, or None if its shapes are not known yet."""
        device = self.transport.device
        if msg.header:
            return [torch.empty(HEADER_LEN, dtype=torch.int64, device=device)]
        if not msg.grad:
            metas = self.metas.get((msg.stream, msg.position))
            if metas is None:
                header = self._header_msg(msg)
                if header in self.pending and self.pending[header][0].done:
                    self._complete(header)
                metas = self.metas.get((msg.stream, msg.position))
                if metas is None:
                    return None
            return [torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas]
        metas = self.sent_metas.get((msg.stream, msg.position - 1))
        if metas is None:
            return None
        return [
            torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas if m.requires_grad
        ]

    def _header_msg(self, msg: Message) -> Message:
        for m in self.plan.incoming[msg.src]:
            if m.header and m.stream == msg.stream and m.position == msg.position:
                return m
        raise AssertionError("activation without header")  # plan bug

    def _post_receives(self, limit: int, block_for: Message | None = None) -> None:
        """Post, per source in sender order, receives needed by actions before ``limit``.

        With ``block_for``, keep going (waiting for headers as needed) until that
        message is posted."""
        posts: list[tuple[Message, list[torch.Tensor]]] = []
        for src, queue in self.plan.incoming.items():
            k = self.posted_upto[src]
            while k < len(queue):
                msg = queue[k]
                must = block_for is not None and block_for.src == src and block_for.seq >= msg.seq
                if not must and self.need[msg] >= limit:
                    break
                bufs = self._buffers_for(msg)
                if bufs is None:
                    if not must:
                        break
                    self._flush(posts)
                    posts = []
                    self._complete(self._header_msg(msg))
                    bufs = self._buffers_for(msg)
                    assert bufs is not None
                posts.append((msg, bufs))
                k += 1
            self.posted_upto[src] = k
        self._flush(posts)

    def _flush(self, posts: list[tuple[Message, list[torch.Tensor]]]) -> None:
        for msg, bufs in posts:
            self.pending[msg] = (self.transport.recv(bufs, msg.src, msg.seq), bufs)

    def _complete(self, msg: Message) -> None:
        """Wait for ``msg`` (posting it first if needed) and file its tensors."""
        if msg in self.arrived or (msg.header and (msg.stream, msg.position) in self.metas):
            return
        if msg not in self.pending:
            self._post_receives(self.need[msg] + 1, block_for=msg)
        pending, bufs = self.pending.pop(msg)
        t0 = time.perf_counter()
        kind = "header" if msg.header else ("gradient" if msg.grad else "activation")
        what = (
            f"{kind} of micro-batch {msg.chunk} (stream {msg.stream}) from rank {msg.src} "
            f"on rank {self.rank}"
        )
        self.transport.wait(pending, what)
        if self.record is not None and time.perf_counter() - t0 > 1e-5:
            self.record.waits.append((f"wait {kind} mb{msg.chunk} from r{msg.src}", t0,
                                      time.perf_counter()))
        if msg.header:
            self.metas[(msg.stream, msg.position)] = decode_header(bufs[0])
        else:
            self.arrived[msg] = bufs

    def _receive(self, i: int) -> None:
        """Complete every message action ``i`` needs, so its timed compute never waits."""
        for msg in self.plan.recvs[i]:
            self._complete(msg)

    def _take(self, msgs: list[Message]) -> list[torch.Tensor]:
        payload: list[torch.Tensor] = []
        for msg in msgs:
            self._complete(msg)
            if not msg.header:
                payload = self.arrived.pop(msg)
        return payload

    # ------------------------------------------------------------------ sends
    def _send(self, i: int, tensors: list[torch.Tensor], metas: list[TensorMeta] | None) -> None:
        for msg in self.plan.sends[i]:
            if msg.header:
                assert metas is not None
                self.transport.send([encode_header(metas, self.transport.device)], msg.dst,
                                    msg.seq)
            else:
                self.transport.send([t.detach().contiguous() for t in tensors], msg.dst,
                                    msg.seq)

    # ------------------------------------------------------------------ actions
    def _module(self, phase: int) -> nn.Module:
        return self.modules[self.layout.module_index(self.rank, phase)]

    def _run_one(self, i: int) -> None:
        action = self.plan.actions[i]
        if action.op is Op.FORWARD:
            inputs = self._forward_inputs(i, action)
            module = self._module(action.phase)
            if is_parted(module):
                task = parted_forward(module, inputs, self._waiter())
                if task.grad:
                    self.records[(action.phase, action.chunk)] = task
                self._forward_finish(i, action, task.inputs, task.outputs, None)
            else:
                self._forward_finish(i, action, inputs, module(*inputs), None)
        elif action.op is Op.WEIGHT:
            work = self.deferred.pop((action.phase, action.chunk), None)
            if work is not None:
                work.run()
        else:
            grads = self._backward_grads(i, action)
            roots, leaves = self.saved.pop((action.phase, action.chunk))
            record = self.records.pop((action.phase, action.chunk), None)
            if record is not None:
                in_grads, works = parted_backward(record, roots, grads, leaves,
                                                  action.op is Op.INPUT, self.split,
                                                  self._waiter())
                if action.op is Op.INPUT:
                    self.deferred[(action.phase, action.chunk)] = works
            elif action.op is Op.INPUT and self.split:
                in_grads, work = backward_input(roots, grads, leaves)
                self.deferred[(action.phase, action.chunk)] = work
            else:
                in_grads = backward_full(roots, grads, leaves)
                if action.op is Op.INPUT:
                    self.deferred[(action.phase, action.chunk)] = None
            self._backward_finish(i, action, leaves, in_grads)

    def _run_pair(self, i: int) -> None:
        fwd, bwd = self.plan.actions[i], self.plan.actions[i + 1]
        module0, module1 = self._module(fwd.phase), self._module(bwd.phase)
        fb = getattr(type(module0), "overlapped_forward_backward", None)
        # a pair starts when both halves' inputs are here
        self._guarded(Overlap(fwd, bwd), lambda: (self._receive(i), self._receive(i + 1)))
        t0 = time.perf_counter()
        if fb is None and (bwd.phase, bwd.chunk) in self.records:
            self._guarded(Overlap(fwd, bwd), lambda: self._run_parted_pair(i))
        elif fb is None or bwd.op is not Op.BACKWARD:
            self._guarded(fwd, lambda: self._run_one(i))
            self._guarded(bwd, lambda: self._run_one(i + 1))
        else:
            self._guarded(Overlap(fwd, bwd), lambda: self._run_overlapped(i, fb, module0, module1))
        if self.record is not None:
            self.record.steps.append((Overlap(fwd, bwd), t0, time.perf_counter()))

    def _waiter(self) -> Waiter:
        events = self.record.parts if self.record is not None else None
        return Waiter(self.transport.timeout, self.transport.check_error, events)

    def _run_parted_pair(self, i: int) -> None:
        """An F&B pair whose backward is a parted stage's: the two interleaved."""
        fwd, bwd = self.plan.actions[i], self.plan.actions[i + 1]
        inputs0 = self._forward_inputs(i, fwd)
        grads1 = self._backward_grads(i + 1, bwd)
        roots1, leaves1 = self.saved.pop((bwd.phase, bwd.chunk))
        record1 = self.records.pop((bwd.phase, bwd.chunk))
        task0, in_grads, works = parted_pair(
            self._module(fwd.phase), inputs0, record1, roots1, grads1, leaves1,
            bwd.op is Op.INPUT, self.split, self._waiter())
        if bwd.op is Op.INPUT:
            self.deferred[(bwd.phase, bwd.chunk)] = works
        if task0.grad:
            self.records[(fwd.phase, fwd.chunk)] = task0
        self._forward_finish(i, fwd, task0.inputs, task0.outputs, None)
        self._backward_finish(i + 1, bwd, leaves1, in_grads)

    def _run_overlapped(self, i: int, fb: Callable[..., Any], module0: nn.Module,
                        module1: nn.Module) -> None:
        fwd, bwd = self.plan.actions[i], self.plan.actions[i + 1]
        inputs0 = self._forward_inputs(i, fwd)
        grads1 = self._backward_grads(i + 1, bwd)
        roots1, leaves1 = self.saved.pop((bwd.phase, bwd.chunk))
        last0 = self.layout.is_last(self.rank, fwd.phase)
        last1 = self.layout.is_last(self.rank, bwd.phase)
        labels0 = list(self._labels(fwd)) if last0 else None
        for leaf in leaves1:
            leaf.grad = None
        out0, loss0 = fb(
            module0,
            list(inputs0),
            self.data.criterion if last0 else None,
            labels0,
            module1,
            roots1[0] if last1 else None,
            None if last1 else list(roots1),
            None if last1 else list(grads1),
        )
        in_grads: list[torch.Tensor | None] = [leaf.grad for leaf in leaves1]
        for leaf in leaves1:
            leaf.grad = None
        self._forward_finish(i, fwd, inputs0, out0, loss0)
        self._backward_finish(i + 1, bwd, leaves1, in_grads)

    def _labels(self, action: Action) -> tuple[torch.Tensor | None, ...]:
        labels = self.data.labels
        assert labels is not None
        return labels[action.chunk]

    def _forward_inputs(self, i: int, action: Action) -> tuple[torch.Tensor, ...]:
        stream, pos = self.layout.locate(self.rank, action.phase)
        training = self.data.training
        if pos == 0:
            assert self.data.inputs is not None
            return self.data.inputs[action.chunk]
        prev = self.layout.prev(self.rank, action.phase)
        assert prev is not None
        if prev[0] == self.rank:
            outs = self.local.pop((False, stream, pos - 1, action.chunk))
            return tuple(t.detach().requires_grad_(training and t.requires_grad) for t in outs)
        bufs = self._take(self.plan.recvs[i])
        metas = self.metas[(stream, pos - 1)]
        if training:
            for t, m in zip(bufs, metas, strict=True):
                if m.requires_grad:
                    t.requires_grad_(True)
        return tuple(bufs)

    def _forward_finish(
        self,
        i: int,
        action: Action,
        inputs: Sequence[torch.Tensor],
        out: Any,
        loss: torch.Tensor | None,
    ) -> None:
        outputs = _as_tuple(out)
        stream, pos = self.layout.locate(self.rank, action.phase)
        leaves = [t for t in inputs if t.requires_grad and t.grad_fn is None] if pos else []
        if self.layout.is_last(self.rank, action.phase):
            if loss is None and self.data.criterion is not None:
                loss = self.data.criterion(*outputs, *self._labels(action))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise PipelineError("criterion must return a scalar tensor")
            if loss is not None:
                self._losses[action.chunk] = loss.detach()
            if self.data.return_outputs:
                self._outputs[action.chunk] = tuple(t.detach() for t in outputs)
            if self.data.training:
                assert loss is not None
                self.saved[(action.phase, action.chunk)] = ([loss], leaves)
            return
        if self.data.training:
            roots: list[Any] = [t for t in outputs if t.requires_grad]
            if not self.keep_outputs:
                # keep only the outputs' places in the graph: a sent activation is freed as
                # soon as its send completes, not at its backward
                roots = [get_gradient_edge(t) for t in roots]
            self.saved[(action.phase, action.chunk)] = (roots, leaves)
        nxt = self.layout.next(self.rank, action.phase)
        assert nxt is not None
        if nxt[0] == self.rank:
            self.local[(False, stream, pos, action.chunk)] = list(outputs)
            return
        metas = [TensorMeta.of(t) for t in outputs]
        if not self.data.training:
            metas = [TensorMeta(m.shape, m.dtype, False) for m in metas]
        known = self.sent_metas.get((stream, pos))
        if known is None:
            self.sent_metas[(stream, pos)] = metas
        elif known != metas:
            raise PipelineError(
                f"micro-batch {action.chunk} produced tensors {metas} where "
                f"{'an earlier step' if self.static_shapes else 'micro-batch 0'} produced "
                f"{known}: all micro-batches of a step must have the same shapes"
                + (" (and with static_shapes=True, of every step)" if self.static_shapes else "")
            )
        self._send(i, list(outputs), metas if self.plan.sends[i][0].header else None)

    def _backward_grads(self, i: int, action: Action) -> list[torch.Tensor | None]:
        stream, pos = self.layout.locate(self.rank, action.phase)
        if self.layout.is_last(self.rank, action.phase):
            return [None]
        nxt = self.layout.next(self.rank, action.phase)
        assert nxt is not None
        if nxt[0] == self.rank:
            return list(self.local.pop((True, stream, pos + 1, action.chunk)))
        return list(self._take(self.plan.recvs[i]))

    def _backward_finish(
        self,
        i: int,
        action: Action,
        leaves: list[torch.Tensor],
        in_grads: Sequence[torch.Tensor | None],
    ) -> None:
        stream, pos = self.layout.locate(self.rank, action.phase)
        if pos == 0:
            return
        grads = [
            g if g is not None else torch.zeros_like(leaf)
            for leaf, g in zip(leaves, in_grads, strict=True)
        ]
        prev = self.layout.prev(self.rank, action.phase)
        assert prev is not None
        if prev[0] == self.rank:
            self.local[(True, stream, pos, action.chunk)] = grads
        else:
            self._send(i, grads, None)
