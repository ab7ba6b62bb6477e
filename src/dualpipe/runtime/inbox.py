"""The inbox of one step: posts receives in each sender's order, completes them, and
holds what has arrived until an action takes it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..schedules.comm import Message
from .p2p import BaseTransport, Pending, decode_header
from .protocol import STAMP_SEQ, Stamp
from .shapes import BoundaryShapes

if TYPE_CHECKING:
    from .plan import ExecutionPlan, PlannedStep
    from .record import StepRecord

__all__ = ["Inbox"]


class Inbox:
    """Receives of one rank for one step.

    The first message from each source is its step stamp; nothing else from that
    source is posted before the stamp has arrived and agrees with this rank's
    (``stamp``). Receives from each source are posted strictly in its sending order. A
    payload can only be posted once its shapes are known (an activation's from the
    boundary's header, a gradient's from the activation this rank sent); :meth:`post`
    posts what is due and possible without blocking, :meth:`complete` blocks until
    one message is in."""

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
        self._posted = {src: 0 for src in plan.incoming}  # per source: messages posted
        self._index = {m: k for msgs in plan.incoming.values() for k, m in enumerate(msgs)}
        self._pending: dict[Message, tuple[Pending, list[torch.Tensor]]] = {}
        self._arrived: dict[Message, list[torch.Tensor]] = {}
        self._done: set[Message] = set()
        self._stamp = stamp
        self._stamps = {src: (transport.recv([buf], src, STAMP_SEQ), buf)
                        for src in plan.incoming for buf in [Stamp.buffer(transport.device)]}

    def _check_stamp(self, src: int) -> None:
        """Wait for ``src``'s stamp of this step and compare it with this rank's."""
        pending, buf = self._stamps.pop(src)
        self._transport.wait(
            pending,
            f"rank {src} to start step {self._stamp.step} (its first message, on rank "
            f"{self._plan.rank})",
        )
        self._stamp.check(buf, src, self._plan.rank)

    # ----------------------------------------------------------------- posting
    def post(self, step: PlannedStep) -> None:
        """Post the receives due before ``step`` (as far as shapes are known)."""
        for src, due in step.due.items():
            self._advance(src, due, block=False)

    def _advance(self, src: int, upto: int, block: bool) -> None:
        """Post receives from ``src`` until ``upto`` are posted. Without ``block``, stop
        at a payload whose header has not arrived yet; with it, wait for that header."""
        if src in self._stamps:
            if not (block or self._stamps[src][0].done):
                return
            self._check_stamp(src)
        queue = self._plan.incoming[src]
        k = self._posted[src]
        device = self._transport.device
        while k < upto:
            msg = queue[k]
            bufs = self._shapes.buffers(msg, device)
            if bufs is None:
                if msg.grad:  # shaped like what this rank sends before it needs this
                    assert not block, f"{msg} needed before its activation was sent"
                    break
                header = self._header_of(msg)
                pending = self._pending.get(header)
                if pending is None or not (block or pending[0].done):
                    break
                self._finish(header)
                bufs = self._shapes.buffers(msg, device)
                assert bufs is not None, msg
            self._pending[msg] = (self._transport.recv(bufs, src, msg.seq), bufs)
            k += 1
        self._posted[src] = k

    def _header_of(self, msg: Message) -> Message:
        """The header announcing ``msg``'s boundary (it precedes ``msg`` from ``src``)."""
        for m in self._plan.incoming[msg.src]:
            if m.header and m.stream == msg.stream and m.position == msg.position:
                return m
        raise AssertionError(f"no header announces {msg}")  # a plan bug

    # ----------------------------------------------------------------- completing
    def _finish(self, msg: Message) -> None:
        """Wait for the posted ``msg`` and file its contents."""
        if msg in self._done:
            return
        pending, bufs = self._pending.pop(msg)
        t0 = time.perf_counter()
        kind = "header" if msg.header else ("gradient" if msg.grad else "activation")
        self._transport.wait(
            pending,
            f"{kind} of micro-batch {msg.chunk} (stream {msg.stream}) from rank {msg.src} "
            f"on rank {self._plan.rank}",
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
        """Block until ``msg`` has arrived (posting it, and what precedes it, first)."""
        if msg in self._done:
            return
        if msg not in self._pending:
            self._advance(msg.src, self._index[msg] + 1, block=True)
        self._finish(msg)

    def take(self, msg: Message) -> list[torch.Tensor]:
        """The tensors of payload ``msg`` (waiting for them if needed); handed over once."""
        self.complete(msg)
        return self._arrived.pop(msg)

    @property
    def outstanding(self) -> int:
        """Receives posted and not completed."""
        return len(self._pending)
