"""What every transport shares: posting in order, bounded waits, draining a failed step."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import PipelineError, RemoteFailure, StepTimeout
from .pending import Pending
from .protocol import wire_tag

__all__ = ["BaseTransport", "PostedMessage", "DRAIN_SECONDS"]

DRAIN_SECONDS = 30.0
"""At most this long, after a failure, for the ranks to complete the step's open messages."""

@dataclass(frozen=True)
class PostedMessage:
    """One message posted in the current step (for draining after a failure)."""

    peer: int
    tag: int
    send: bool
    specs: tuple[tuple[tuple[int, ...], torch.dtype], ...]


class BaseTransport:
    """Non-blocking messages between the ranks of one pipeline, with bounded waits.

    Messages are addressed by their number in the step (``seq``); the wire tag adds the
    pipeline and the step (:func:`dualpipe.transport.protocol.wire_tag`). Subclasses post
    messages (:meth:`_submit`, :meth:`_post_now`), share failures (:meth:`post_error`,
    :meth:`posted_error`) and notes (:meth:`_publish`, :meth:`_read`); waiting,
    draining and swapping live here once.

    Attributes:
        rank: this pipeline rank.
        num_ranks: ranks of the pipeline.
        device: where message tensors live.
        timeout: seconds a wait may last before the step fails.
        pipeline: the pipeline's number (part of every tag).
        step: the step counter (part of every tag).
    """

    def __init__(self, rank: int, num_ranks: int, device: torch.device, timeout: float) -> None:
        self.rank = rank
        self.num_ranks = num_ranks
        self.device = device
        self.timeout = timeout
        self.pipeline = 0
        self.step = 0
        self._sends: list[Pending] = []
        self._ops: list[tuple[PostedMessage, Pending]] = []
        self._lock = threading.Lock()  # posting vs. a failure noticed by another thread
        self._failure: str | None = None  # another rank's failure, once noticed
        self._own_error: str | None = None  # the failure this rank posted
        self._drain_lock = threading.Lock()
        self._drained: tuple[int, bool] | None = None  # (step, result) of the last drain

    # ----------------------------------------------------------------- backend
    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        raise NotImplementedError

    def _post_now(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                  ) -> Callable[[float], None]:
        """Post at once from the calling thread; returns ``wait(seconds)``."""
        raise NotImplementedError

    def _publish_error(self, message: str) -> None:
        """Leave ``message`` where every rank reads failures, unless one is there already
        (the first failure posted in a pipeline is the one every rank reports)."""
        raise NotImplementedError

    def posted_error(self) -> str | None:
        """The failure another rank posted, if any."""
        raise NotImplementedError

    def _publish(self, name: str, value: bytes) -> None:
        """Leave a note every rank of the pipeline can read."""
        raise NotImplementedError

    def _read(self, name: str) -> bytes | None:
        """A note, or None if not (yet) there."""
        raise NotImplementedError

    def _forget(self, name: str) -> None:
        """Delete a note this rank left (no error if it is not there)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds (threads); idempotent."""

    # ----------------------------------------------------------------- messages
    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed (a failure posted earlier in this
        pipeline, by any rank, is kept: it is what every rank reports)."""
        self._own_error = self._own_error or message
        self._publish_error(message)

    def check_error(self, fresh: bool = False) -> None:
        """Raise :class:`RemoteFailure` if a rank (this one included) posted a failure.

        Cheap by default, for polling loops: a failure already noticed (by this thread or
        the backend's watch) raises at once, and the backend decides how often it really
        asks (:meth:`_poll_error`). ``fresh=True`` always asks."""
        message = self._failure or self._own_error
        if message is None:
            message = self.posted_error() if fresh else self._poll_error()
        if message is not None:
            raise RemoteFailure(message)

    def _poll_error(self) -> str | None:
        """:meth:`posted_error`, as often as a polling loop may afford it (here: always)."""
        return self.posted_error()

    def begin_step(self, step: int) -> None:
        """Messages from now on belong to ``step``."""
        self.step = step
        self._ops = []

    def tag(self, seq: int) -> int:
        """The wire tag of message ``seq`` of the current step."""
        return wire_tag(self.pipeline, self.step, seq)

    def _post(self, tensors: list[torch.Tensor], peer: int, seq: int, send: bool) -> Pending:
        tag = self.tag(seq)
        with self._lock:
            if self._failure is not None:
                raise RemoteFailure(self._failure)
            pending = self._submit(tensors, peer, tag, send)
            op = PostedMessage(peer, tag, send, tuple((tuple(t.shape), t.dtype) for t in tensors))
            self._ops.append((op, pending))
        return pending

    def notice_failure(self, message: str) -> None:
        """Another rank failed (noticed off the main thread): post nothing more and
        complete the step's open messages."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = message
        self.drain_failed_step(min(self.timeout, DRAIN_SECONDS))

    def send(self, tensors: Sequence[torch.Tensor], peer: int, seq: int) -> Pending:
        """Send ``tensors`` (message ``seq`` of the step) to pipeline rank ``peer``; returns
        at once. The tensors are kept alive until delivered."""
        pending = self._post(list(tensors), peer, seq, send=True)
        self._sends.append(pending)
        return pending

    def recv(self, buffers: Sequence[torch.Tensor], peer: int, seq: int) -> Pending:
        """Receive message ``seq`` of the step from pipeline rank ``peer`` into
        ``buffers``; returns at once. Complete it with :meth:`wait`."""
        return self._post(list(buffers), peer, seq, send=False)

    def wait(self, pending: Pending, what: str, host: bool = True) -> None:
        """Complete ``pending``; fail after ``timeout`` seconds, or as soon as another rank
        reports a failure. ``host=False``: the caller only needs the data on the device
        stream, so a device backend lets the stream wait instead of the host."""
        if not host and pending.on_stream():
            return
        if not pending.done:
            deadline = time.monotonic() + self.timeout
            while not pending.wait_for(0.2):
                self.check_error()
                if time.monotonic() > deadline:
                    raise PipelineError(f"timed out after {self.timeout:.1f} s waiting for {what}")
        if pending.error is not None:
            self.check_error(fresh=True)
            raise PipelineError(f"communication failed while waiting for {what}: {pending.error}")

    def send_bytes_in_flight(self) -> int:
        """Bytes of sends not yet delivered (their buffers are still held)."""
        self._sends = [p for p in self._sends if not p.done]
        return sum(t.nbytes for p in self._sends for t in (p.keep or ()))

    def sends_in_flight(self) -> list[torch.Tensor]:
        """The buffers of sends not yet delivered."""
        self._sends = [p for p in self._sends if not p.done]
        return [t for p in self._sends for t in (p.keep or ())]

    def drain_sends(self, what: str) -> None:
        """Wait until every send has been delivered."""
        for pending in self._sends:
            self.wait(pending, what)
        self._sends = []

    def finish_step(self) -> None:
        """Every message of the current step completed on this rank: say so (one note,
        overwritten each step), so that a rank draining a step that failed after this
        one finished it does not wait for this rank's drain note."""
        try:
            self._publish(f"finished/{self.rank}", str(self.step).encode())
        except Exception:  # noqa: BLE001, S110 - best effort: a drain then waits longer
            pass

    def _finished(self, rank: int) -> bool:
        """Whether ``rank`` said it finished the current step (:meth:`finish_step`)."""
        note = self._read(f"finished/{rank}")
        return note is not None and int(note) >= self.step

    def exchange(self, tensor: torch.Tensor, peer: int, seq: int, what: str) -> torch.Tensor:
        """Swap a tensor of the same shape with ``peer`` (blocking, with a deadline)."""
        other = torch.empty_like(tensor)
        # the lower rank sends first, the higher receives first: both issue the two
        # operations in the same order (as NCCL needs)
        if self.rank < peer:
            outgoing = self.send([tensor], peer, seq)
            incoming = self.recv([other], peer, seq)
        else:
            incoming = self.recv([other], peer, seq)
            outgoing = self.send([tensor], peer, seq)
        self.wait(incoming, what)
        self.wait(outgoing, what)
        self._sends.remove(outgoing)
        return other

    def forget_note(self, name: str) -> None:
        """Delete what this rank left under ``name`` with :meth:`swap_notes` (once every
        peer has read it), so a long job does not grow the store."""
        self._forget(f"{name}/{self.rank}")

    def swap_notes(self, name: str, value: bytes, peers: Sequence[int], what: str
                   ) -> dict[int, bytes]:
        """Leave ``value`` under ``name`` for ``peers`` and read theirs (through the store,
        not messages: it needs no matching operation). Fails at once when a rank posts a
        failure, and after ``timeout`` seconds (:class:`StepTimeout`)."""
        self._publish(f"{name}/{self.rank}", value)
        deadline = time.monotonic() + self.timeout
        found: dict[int, bytes] = {}
        while True:
            for peer in peers:
                if peer not in found:
                    note = self._read(f"{name}/{peer}")
                    if note is not None:
                        found[peer] = note
            if len(found) == len(peers):
                return found
            self.check_error()  # a polling loop: the backend decides how often it asks
            if time.monotonic() > deadline:
                missing = sorted(set(peers) - set(found))
                raise StepTimeout(f"timed out after {self.timeout:.1f} s waiting for {what} "
                                  f"from ranks {missing}")
            time.sleep(0.002)

    # ----------------------------------------------------------------- failures
    def drain_failed_step(self, within: float) -> bool:
        """After a failed step, complete every message of it still open on either side,
        so nothing of the step is left posted (every rank calls this).

        Each rank publishes the messages it posted that have not completed; each then
        posts, directly, the counterpart of every message a peer posted towards it that
        it never posted itself (zeros of the peer's shapes), and waits for all of them.
        Returns False if some rank did not take part or a message did not complete
        within ``within`` seconds (what is left then ends at the pipeline's timeout)."""
        with self._drain_lock:
            if self._drained is not None and self._drained[0] == self.step:
                return self._drained[1]  # drained already (by the failure watch)
            complete = self._drain(within)
            self._drained = (self.step, complete)
            return complete

    def _drain(self, within: float) -> bool:
        import pickle

        deadline = time.monotonic() + within
        with self._lock:
            mine = [(op, p) for op, p in self._ops]
        posted = {(op.peer, op.tag, op.send) for op, _ in mine}
        open_ops = [op for op, p in mine if not p.done]
        self._publish(f"drain/{self.step}/{self.rank}", pickle.dumps(open_ops))
        waits: list[Callable[[float], None]] = []
        complete = True
        for r in range(self.num_ranks):
            if r == self.rank:
                continue
            note = self._read(f"drain/{self.step}/{r}")
            while note is None and time.monotonic() < deadline:
                if self._finished(r):  # nothing of the step left open on its side
                    break
                time.sleep(0.01)
                note = self._read(f"drain/{self.step}/{r}")
            if note is None:
                complete = complete and self._finished(r)
                continue
            for op in pickle.loads(note):
                if op.peer != self.rank or (r, op.tag, not op.send) in posted:
                    continue
                zeros = [torch.zeros(shape, dtype=dtype, device=self.device)
                         for shape, dtype in op.specs]
                waits.append(self._post_now(zeros, r, op.tag, send=not op.send))
        try:
            for wait in waits:
                wait(max(0.1, deadline - time.monotonic()))
            for _, pending in mine:
                if not pending.wait_for(max(0.1, deadline - time.monotonic())):
                    complete = False
        except Exception:  # noqa: BLE001 - best effort: the step failed already
            complete = False
        self._sends = []
        self._ops = []
        return complete
