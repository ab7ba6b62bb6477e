"""Point-to-point transport over ``torch.distributed``: headers, posting, bounded waits.

* Tensor metadata travels in a fixed-size int64 *header* so receivers never need
  declared shapes.
* Sends and receives are issued at once, from the calling thread, in the order the
  caller issues them (the step's :class:`~dualpipe.runtime.mailbox.Mailbox` keeps the
  plan's order, which NCCL needs). With gloo the thread that needs a message waits
  for it in gloo itself, and a send's completion is collected once a later message
  from the same peer shows it was matched; one small thread per pipeline watches the
  store for other ranks' failures, and messages of 256 KiB or more go to a thread
  per peer and direction. With NCCL no thread waits: a received tensor is
  handed to the device stream (:meth:`Pending.on_stream`) and the host only polls for
  completion where it must read a message (headers, stamps).
* Waits are bounded: a waiting rank gives up after ``timeout`` seconds, and
  notices within a fraction of a second when another rank has posted a failure
  to the process group's store.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PipelineError, RemoteFailure
from .protocol import wire_tag

__all__ = [
    "HEADER_LEN",
    "TensorMeta",
    "encode_header",
    "decode_header",
    "PipelineError",
    "RemoteFailure",
    "BaseTransport",
    "Transport",
    "Pending",
]

HEADER_LEN = 128
_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPE_CODE[getattr(torch, _name)] = len(_DTYPES)
        _DTYPES.append(getattr(torch, _name))


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a receiver needs to allocate one tensor of a boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(t: torch.Tensor) -> TensorMeta:
        return TensorMeta(tuple(t.shape), t.dtype, t.requires_grad)


def encode_header(metas: Sequence[TensorMeta], device: torch.device) -> torch.Tensor:
    """Pack metadata of a boundary's tensors into one int64 tensor of ``HEADER_LEN``."""
    words: list[int] = [len(metas)]
    for m in metas:
        if m.dtype not in _DTYPE_CODE:
            raise PipelineError(f"cannot send tensors of dtype {m.dtype} between stages")
        words += [_DTYPE_CODE[m.dtype], int(m.requires_grad), len(m.shape), *m.shape]
    if len(words) > HEADER_LEN:
        raise PipelineError(
            f"stage boundary carries too many tensors/dimensions to describe ({len(words)} words > "
            f"{HEADER_LEN})"
        )
    words += [0] * (HEADER_LEN - len(words))
    return torch.tensor(words, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> list[TensorMeta]:
    """Inverse of :func:`encode_header`."""
    words = header.tolist()
    count, i, metas = words[0], 1, []
    for _ in range(count):
        code, rg, ndim = words[i], words[i + 1], words[i + 2]
        shape = tuple(words[i + 3 : i + 3 + ndim])
        metas.append(TensorMeta(shape, _DTYPES[code], bool(rg)))
        i += 3 + ndim
    return metas


class Pending:
    """Completion of one message (one or more tensors), marked by whoever learns of it
    (a waiting thread, or the in-process transport).

    ``keep`` holds send buffers until the message is delivered; they are dropped the
    moment it is."""

    __slots__ = ("_done", "_event", "error", "keep")

    def __init__(self, keep: list[torch.Tensor] | None = None) -> None:
        self._done = False
        self._event: threading.Event | None = None  # made only for a thread that waits
        self.error: BaseException | None = None
        self.keep = keep

    @property
    def done(self) -> bool:
        """Whether the message has completed (never blocks)."""
        return self._done

    def mark_done(self) -> None:
        """Record completion (from any thread) and wake whoever waits."""
        self.keep = None
        with _EVENTS:
            self._done = True
            event = self._event
        if event is not None:
            event.set()

    def wait_for(self, seconds: float) -> bool:
        """Block the host up to ``seconds`` for completion; True once complete."""
        with _EVENTS:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(seconds)

    def on_stream(self) -> bool:
        """Leave completion to the device: make the current stream wait for the message
        and return True, or return False when the host must wait (gloo, in-process)."""
        return False


_EVENTS = threading.Lock()


class DevicePending(Pending):
    """Completion of a message posted on a device backend (NCCL), read from its works:
    polled by the host where it must read the message, awaited by the stream otherwise."""

    __slots__ = ("works",)

    def __init__(self, works: list[dist.Work], keep: list[torch.Tensor] | None) -> None:
        super().__init__(keep)
        self.works = works

    @property
    def done(self) -> bool:
        if not self._done:
            try:
                if not all(w.is_completed() for w in self.works):
                    return False
            except Exception as exc:  # noqa: BLE001 - reported by the waiter
                self.error = exc
            self.mark_done()
        return True

    def wait_for(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not self.done:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True

    def on_stream(self) -> bool:
        for work in self.works:
            work.wait()  # NCCL: the current stream waits; the host does not
        return True


class GlooPending(Pending):
    """Completion of a message posted on gloo, learned by waiting in gloo itself.

    gloo's ``is_completed()`` only turns true inside ``wait()``, so completion is known
    once a thread has waited. The main thread does so when it needs the message (one
    thread waits on a message at a time: :meth:`claim`); a send is waited for once the
    order says it has been matched (:meth:`Transport.wait`), or at the end of the step."""

    __slots__ = ("works", "peer", "index", "_claimed")

    def __init__(self, works: list[dist.Work], keep: list[torch.Tensor] | None, peer: int,
                 index: int) -> None:
        super().__init__(keep)
        self.works = works
        self.peer = peer
        self.index = index
        self._claimed = False

    def claim(self) -> bool:
        """True for the one caller that may wait in gloo for this message."""
        with _CLAIMS:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def complete(self, limit: float | timedelta) -> None:
        """Wait in gloo (at most ``limit`` seconds; gloo closes the connection on expiry),
        then let go of the works: a gloo work holds its tensor, which must be freed once
        the message is delivered."""
        if not isinstance(limit, timedelta):
            limit = timedelta(seconds=limit)
        try:
            for work in self.works:
                work.wait(limit)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc
        self.works = []
        self.mark_done()

    def wait_for(self, seconds: float) -> bool:
        if self.claim():
            self.complete(seconds)
            return True
        return super().wait_for(seconds)


_CLAIMS = threading.Lock()


LARGE_MESSAGE = 256 * 1024
"""With gloo, messages of at least this many bytes are handed to a thread per peer and
direction, which posts the sends and waits for both: gloo copies into the socket in
the posting thread, which would hold up compute, and large transfers measured faster
this way (``benchmarks/RESULTS.md``)."""


class _LargeMessages:
    """A daemon thread for the large gloo messages with one peer in one direction: it
    posts each send (in issue order) and waits for each message (no other thread
    touches their works). Messages with one peer in one direction complete in order
    anyway, so one thread per peer and direction holds nothing up."""

    def __init__(self, transport: Transport, peer: int, send: bool) -> None:
        self._transport = transport
        self._send = send
        self._jobs: queue.SimpleQueue[tuple[list[torch.Tensor], int, int, GlooPending] | None]
        self._jobs = queue.SimpleQueue()
        name = f"dualpipe-{'send-to' if send else 'recv-from'}-{peer}"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, tensors: list[torch.Tensor], peer: int, tag: int,
               pending: GlooPending) -> None:
        self._jobs.put((tensors, peer, tag, pending))

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(*job)
            del job  # a delivered message's tensors must not wait here for the next one

    def _run(self, tensors: list[torch.Tensor], peer: int, tag: int,
             pending: GlooPending) -> None:
        if self._send:
            try:
                pending.works = self._transport._issue(tensors, peer, tag, send=True)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter
                pending.error = exc
                pending.mark_done()
                return
        pending.complete(self._transport._limit)

    def close(self, wait: float) -> bool:
        """Stop the thread once its queued messages are done; True if it ended in time."""
        self._jobs.put(None)
        self._thread.join(wait)
        return not self._thread.is_alive()


class _FailureWatch:
    """A daemon thread that looks for a failure posted by another rank every ``period``
    seconds and, when one is, stops the transport from posting and completes the
    step's open messages (:meth:`BaseTransport.drain_failed_step`): that wakes the main
    thread if it is waiting in gloo. :meth:`close` ends the thread."""

    def __init__(self, transport: Transport, period: float = 0.2) -> None:
        self._transport = transport
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dualpipe-failure-watch",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                message = self._transport._posted_error()
            except RemoteFailure as exc:
                message = str(exc)
            if message is not None:
                self._transport._fail(message)
                return

    def close(self, wait: float) -> bool:
        """Stop the thread; True if it ended within ``wait`` seconds."""
        self._stop.set()
        self._thread.join(wait)
        return not self._thread.is_alive()


@dataclass(frozen=True)
class _Op:
    """One message posted in the current step (for draining after a failure)."""

    peer: int
    tag: int
    send: bool
    specs: tuple[tuple[tuple[int, ...], torch.dtype], ...]


class BaseTransport:
    """Non-blocking messages between the ranks of one pipeline, with bounded waits.

    Messages are addressed by their number in the step (``seq``); the wire tag adds the
    pipeline and the step (:func:`dualpipe.runtime.protocol.wire_tag`). Subclasses post
    messages (:meth:`_submit`, :meth:`_post_now`), share failures (:meth:`post_error`,
    :meth:`_posted_error`) and notes (:meth:`_publish`, :meth:`_read`); waiting,
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
        self._ops: list[tuple[_Op, Pending]] = []
        self._lock = threading.Lock()  # posting vs. a failure noticed by another thread
        self._failure: str | None = None  # another rank's failure, once noticed
        self._drain_lock = threading.Lock()
        self._drained: tuple[int, bool] | None = None  # (step, result) of the last drain

    # ----------------------------------------------------------------- backend
    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        raise NotImplementedError

    def _post_now(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                  ) -> Callable[[float], None]:
        """Post at once from the calling thread; returns ``wait(seconds)``."""
        raise NotImplementedError

    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed."""
        raise NotImplementedError

    def _posted_error(self) -> str | None:
        """The failure another rank posted, if any."""
        raise NotImplementedError

    def _publish(self, name: str, value: bytes) -> None:
        """Leave a note every rank of the pipeline can read."""
        raise NotImplementedError

    def _read(self, name: str) -> bytes | None:
        """A note, or None if not (yet) there."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the transport holds (threads); idempotent."""

    # ----------------------------------------------------------------- messages
    def check_error(self) -> None:
        """Raise :class:`RemoteFailure` if another rank posted a failure."""
        message = self._posted_error()
        if message is not None:
            raise RemoteFailure(message)

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
            op = _Op(peer, tag, send, tuple((tuple(t.shape), t.dtype) for t in tensors))
            self._ops.append((op, pending))
        return pending

    def _fail(self, message: str) -> None:
        """Another rank failed (noticed off the main thread): post nothing more and
        complete the step's open messages."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = message
        self.drain_failed_step(min(self.timeout, 30.0))

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
            self.check_error()
            raise PipelineError(f"communication failed while waiting for {what}: {pending.error}")

    def send_bytes_in_flight(self) -> int:
        """Bytes of sends not yet delivered (their buffers are still held)."""
        self._sends = [p for p in self._sends if not p.done]
        return sum(t.nbytes for p in self._sends for t in (p.keep or ()))

    def drain_sends(self, what: str) -> None:
        """Wait until every send has been delivered."""
        for pending in self._sends:
            self.wait(pending, what)
        self._sends = []

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
                time.sleep(0.01)
                note = self._read(f"drain/{self.step}/{r}")
            if note is None:
                complete = False
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


class Transport(BaseTransport):
    """Point-to-point messages over a ``torch.distributed`` process group.

    Args:
        group: process group (None = default).
        group_ranks: rank in ``group`` of each pipeline rank.
        rank: this pipeline rank.
        device: where messages live (CPU for gloo, the GPU for NCCL).
        timeout: seconds a wait may last before the step fails.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        group_ranks: Sequence[int],
        rank: int,
        device: torch.device,
        timeout: float,
    ) -> None:
        super().__init__(rank, len(group_ranks), device, timeout)
        self.group = group
        self._pg: dist.ProcessGroup | None = (
            group if group is not None else dist.distributed_c10d._get_default_group()
        )
        self.group_ranks = list(group_ranks)
        self.ranks = [dist.get_global_rank(self._pg, g) for g in self.group_ranks]
        self.key = "dualpipe/unnamed"
        # a device backend runs operations on streams: no waiting threads
        self.device_backend = dist.get_backend(group) not in ("gloo", "mpi")
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are noticed by timeout only
            self.store = None
        self._watch: _FailureWatch | None = None
        # per (peer, send): made at the first large message
        self._large: dict[tuple[int, bool], _LargeMessages] = {}
        self._limit = timedelta(seconds=timeout)  # gloo's wait limit: the pipeline's timeout
        self._issued = 0  # operations posted (their order, for sends to be completed)
        self._unmatched: dict[int, deque[GlooPending]] = {}  # per peer: sends not waited

    def _group(self) -> dist.ProcessGroup:
        if self._pg is None:
            raise PipelineError("this pipeline is closed")
        return self._pg

    def _issue(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
               ) -> list[dist.Work]:
        """Post the operations now, from this thread, in order (the process group's own
        send/recv, with group ranks: no Python wrapper, about 20 us less per call)."""
        pg = self._group()
        op = pg.send if send else pg.recv
        try:
            return [op([t], self.group_ranks[peer], tag) for t in tensors]
        except RuntimeError as exc:
            self.check_error()
            raise PipelineError(f"communication failed: {exc}") from exc

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        keep = list(tensors) if send else None
        if self.device_backend:
            return DevicePending(self._issue(tensors, peer, tag, send), keep)
        if self._watch is None and self.store is not None:
            self._watch = _FailureWatch(self)
        self._issued += 1
        if sum(t.nbytes for t in tensors) >= LARGE_MESSAGE:
            # a receive is posted here (in order), a send by the thread; it waits for both
            works = [] if send else self._issue(tensors, peer, tag, send)
            pending = GlooPending(works, keep, peer, self._issued)
            pending.claim()
            helper = self._large.get((peer, send))
            if helper is None:
                helper = self._large[(peer, send)] = _LargeMessages(self, peer, send)
            helper.submit(list(tensors), peer, tag, pending)
            return pending
        works = self._issue(tensors, peer, tag, send)
        pending = GlooPending(works, keep, peer, self._issued)
        if send:
            self._unmatched.setdefault(peer, deque()).append(pending)
        return pending

    def wait(self, pending: Pending, what: str, host: bool = True) -> None:
        """As :meth:`BaseTransport.wait`; with gloo the calling thread waits in gloo
        itself (no thread hand-off: the failure watch wakes it if another rank fails).

        Once a receive from a peer is in, every send to that peer issued before it has
        been matched (both ranks issue in one order, so the peer posted those receives
        before it sent this), so their completion is collected then, at no wait."""
        if isinstance(pending, GlooPending) and not pending.done and pending.claim():
            start = time.monotonic()
            pending.complete(self._limit)
            if pending.error is not None and time.monotonic() - start >= self.timeout:
                raise PipelineError(f"timed out after {self.timeout:.1f} s waiting for {what}")
        if self._failure is not None:
            raise RemoteFailure(self._failure)
        super().wait(pending, what, host)
        if isinstance(pending, GlooPending):
            sends = self._unmatched.get(pending.peer)
            while sends and sends[0].index < pending.index:
                send = sends.popleft()
                if not send.done and send.claim():
                    send.complete(self._limit)

    def drain_sends(self, what: str) -> None:
        """As :meth:`BaseTransport.drain_sends`; then forgets the delivered sends still
        listed for collection (to a peer this rank receives nothing more from)."""
        super().drain_sends(what)
        for sends in self._unmatched.values():
            while sends and sends[0].done:
                sends.popleft()

    def _post_now(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                  ) -> Callable[[float], None]:
        works = self._issue(tensors, peer, tag, send)

        def wait(seconds: float) -> None:
            for work in works:
                work.wait(timedelta(seconds=seconds))

        return wait

    def post_error(self, message: str) -> None:
        """Tell every rank of this pipeline that its step failed."""
        if self.store is not None:
            try:
                self.store.set(f"{self.key}/error", message)
            except Exception:  # noqa: BLE001, S110 - best effort while failing
                pass

    def _posted_error(self) -> str | None:
        if self.store is None:
            return None
        key = f"{self.key}/error"
        try:
            failed = self.store.check([key])
            return self.store.get(key).decode() if failed else None
        except Exception as exc:  # noqa: BLE001 - the store went away with its host rank
            raise RemoteFailure(
                f"lost the process group's store ({type(exc).__name__}); the rank hosting it "
                "has probably failed and exited"
            ) from exc

    def _publish(self, name: str, value: bytes) -> None:
        if self.store is not None:
            self.store.set(f"{self.key}/{name}", base64.b64encode(value).decode())

    def _read(self, name: str) -> bytes | None:
        if self.store is None:
            return None
        key = f"{self.key}/{name}"
        try:
            return base64.b64decode(self.store.get(key)) if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store's host is gone: nothing to read
            return None

    def close(self) -> None:
        """Stop the failure-watch and large-message threads and drop the group."""
        if self._watch is not None:
            self._watch.close(wait=1.0)
            self._watch = None
        for helper in self._large.values():
            helper.close(wait=1.0)
        self._large = {}
        self._unmatched = {}
        self._pg = None
