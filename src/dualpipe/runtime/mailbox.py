"""The messages of one step on one rank: sends and receives issued strictly in the
plan's order, receives completed, and what has arrived held until an action takes it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..schedules.messages import Message
from ..transport.base import BaseTransport
from ..transport.pending import Pending
from ..transport.protocol import STAMP_SEQ, Stamp
from ..transport.wire import decode_header
from .shapes import BoundaryShapes

if TYPE_CHECKING:
    from .plan import ExecutionPlan, Issue, PlannedStep
    from .record import StepRecord

__all__ = ["Mailbox"]


class Mailbox:
    """Sends and receives of one rank for one step, issued in ``plan.ops`` order.

    Every operation is handed to the transport in the order of the plan, which all
    ranks derive from one global order of the step's messages; that is what keeps
    NCCL, which runs the operations between two ranks in issue order, from
    deadlocking (``docs/runtime.md``, "Issue order"). So:

    * a send is issued when its action has run *and* everything before it in the
      order is issued; until then its tensors wait here;
    * a receive is issued when it is due (needed within the plan's look-ahead) or
      a send behind it is waiting, and once its buffers can be allocated: the
      sender's stamp has arrived and agrees with this rank's (``stamp``), and, for a
      boundary's first activation, its header has arrived.

    :meth:`issue` never blocks; :meth:`complete` issues up to the message it needs,
    waiting for stamps and headers on the way, then waits for the message."""

    def __init__(
        self,
        plan: ExecutionPlan,
        transport: BaseTransport,
        shapes: BoundaryShapes,
        stamp: Stamp,
        record: StepRecord | None,
    ) -> None:
        self._plan = plan
        self._transport = transport
        self._shapes = shapes
        self._record = record
        self._stamp = stamp
        self._next = 0  # operations of plan.ops issued so far
        self._due = 0  # operations due by now
        self._waiting: dict[int, list[torch.Tensor]] = {}  # sends ready, not yet issued
        self._stamps: dict[int, tuple[Pending, torch.Tensor]] = {}  # per source, unchecked
        self._pending: dict[Message, tuple[Pending, list[torch.Tensor]]] = {}
        self._arrived: dict[Message, list[torch.Tensor]] = {}
        self._done: set[Message] = set()
        encoded = stamp.encode(transport.device)
        for k, op in enumerate(plan.ops):
            if op.message is None and op.send:
                self._waiting[k] = [encoded]
        self.issue()

    # ----------------------------------------------------------------- issuing
    def send(self, msg: Message, tensors: list[torch.Tensor]) -> None:
        """Hand over the tensors of ``msg``; they go out as soon as the order allows."""
        self._waiting[self._plan.index[msg]] = tensors
        self.issue()

    def post(self, step: PlannedStep) -> None:
        """Issue what is due before ``step`` (as far as possible without waiting)."""
        self._due = max(self._due, step.due)
        self.issue()

    def issue(self) -> None:
        """Issue operations in order while the next one can go without waiting."""
        self._issue(self._due, block=False)

    def _issue(self, upto: int, block: bool) -> None:
        """Issue operations in order: at least the first ``upto`` ones, and further
        receives while a ready send waits behind them. With ``block``, wait for stamps
        and headers the first ``upto`` need; without, stop at the first operation that
        cannot go yet."""
        ops = self._plan.ops
        transport = self._transport
        while self._next < len(ops):
            k = self._next
            op = ops[k]
            seq = STAMP_SEQ if op.message is None else op.message.seq
            if op.send:
                tensors = self._waiting.pop(k, None)
                if tensors is None:
                    # an action that has not run yet; ``block`` never needs past it
                    assert not (block and k < upto), f"{op} needed before it was produced"
                    return
                transport.send(tensors, op.peer, seq)
            else:
                if k >= upto and not self._waiting:
                    return
                bufs = self._buffers(op, block and k < upto)
                if bufs is None:
                    return
                pending = transport.recv(bufs, op.peer, seq)
                if op.message is None:
                    self._stamps[op.peer] = (pending, bufs[0])
                else:
                    self._pending[op.message] = (pending, bufs)
            self._next += 1

    def _buffers(self, op: Issue, block: bool) -> list[torch.Tensor] | None:
        """Receive buffers of ``op``, or None if they cannot be allocated yet without
        waiting (and ``block`` is False)."""
        device = self._transport.device
        msg = op.message
        if msg is None:
            return [Stamp.buffer(device)]
        if op.peer in self._stamps:
            if not (block or self._stamps[op.peer][0].done):
                return None
            self._check_stamp(op.peer)
        bufs = self._shapes.buffers(msg, device)
        if bufs is not None:
            return bufs
        # a gradient is shaped like the activation this rank sent earlier in the order
        assert not msg.grad, f"{msg}: its activation was not sent before it"
        header = self._header_of(msg)
        if not (block or self._pending[header][0].done):
            return None
        self._finish(header)
        return self._shapes.buffers(msg, device)

    def _check_stamp(self, src: int) -> None:
        """Wait for ``src``'s stamp of this step and compare it with this rank's."""
        pending, buf = self._stamps.pop(src)
        self._transport.wait(
            pending,
            f"rank {src} to start step {self._stamp.step} (its first message, on rank "
            f"{self._plan.rank})",
        )
        self._stamp.check(buf, src, self._plan.rank)

    def _header_of(self, msg: Message) -> Message:
        """The header announcing ``msg``'s boundary (it precedes ``msg`` from ``src``)."""
        for m in self._plan.incoming[msg.src]:
            if m.header and m.stream == msg.stream and m.position == msg.position:
                return m
        raise AssertionError(f"no header announces {msg}")  # a plan bug

    # ----------------------------------------------------------------- completing
    def _finish(self, msg: Message) -> None:
        """Wait for the issued ``msg`` and file its contents."""
        if msg in self._done:
            return
        pending, bufs = self._pending.pop(msg)
        t0 = time.perf_counter()
        kind = "header" if msg.header else ("gradient" if msg.grad else "activation")
        self._transport.wait(
            pending,
            f"{kind} of micro-batch {msg.chunk} (stream {msg.stream}) from rank {msg.src} "
            f"on rank {self._plan.rank}",
            host=msg.header,
        )
        if self._record is not None and time.perf_counter() - t0 > 1e-5:
            self._record.waits.append(
                (f"wait {kind} mb{msg.chunk} from r{msg.src}", t0, time.perf_counter())
            )
        self._done.add(msg)
        if msg.header:
            self._shapes.received[(msg.stream, msg.position)] = decode_header(bufs[0])
        else:
            self._arrived[msg] = bufs

    def complete(self, msg: Message) -> None:
        """Block until ``msg`` has arrived (issuing it, and what precedes it, first)."""
        if msg in self._done:
            return
        if msg not in self._pending:
            self._issue(self._plan.index[msg] + 1, block=True)
        self._finish(msg)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the mailbox holds now: sends not yet issued, receives posted or
        arrived and not yet taken (what a recorded step leaves out of its memory)."""
        out = [t for ts in self._waiting.values() for t in ts]
        out.extend(t for _, ts in self._pending.values() for t in ts)
        out.extend(t for ts in self._arrived.values() for t in ts)
        return out

    def take(self, msg: Message) -> list[torch.Tensor]:
        """The tensors of payload ``msg`` (waiting for them if needed); handed over once."""
        self.complete(msg)
        return self._arrived.pop(msg)

    def close(self) -> None:
        """At the end of the step: issue what is left (sends only, by then) and check
        that every operation of the plan was issued."""
        self._issue(len(self._plan.ops), block=True)
        assert self._next == len(self._plan.ops), "operations left unissued at step end"
