"""Point-to-point transport over ``torch.distributed``: headers, posting, bounded waits.

* Tensor metadata travels in a fixed-size int64 *header* so receivers never need
  declared shapes.
* Sends and receives are non-blocking for the caller: per peer and direction, a
  background thread posts each message (``isend``/``irecv``, the message number as
  tag) and waits for it; NCCL messages are posted by the caller through
  ``batch_isend_irecv`` (its point-to-point operations are matched by order).
* Waits are bounded: a waiting rank gives up after ``timeout`` seconds, and
  notices within a fraction of a second when another rank has posted a failure
  to the process group's store.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import PipelineError, RemoteFailure
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
    """Completion of one message (one or more tensors), tracked by a background thread.

    ``keep`` holds send buffers until the message is delivered; they are dropped the
    moment it is."""

    __slots__ = ("event", "error", "keep")

    def __init__(self, keep: list[torch.Tensor] | None = None) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.keep = keep

    @property
    def done(self) -> bool:
        return self.event.is_set()


class _Channel:
    """A daemon thread that carries the messages to (or from) one peer, in order.

    For gloo it both posts each operation and waits for it: the gloo calls (tens of
    microseconds each) leave the main thread, and, since gloo's ``is_completed()``
    only turns true inside ``wait()``, a thread blocking in ``wait()`` is the way to
    learn of completion at once while the main thread still waits with a deadline.
    Each wait is bounded by the pipeline's timeout (passed to gloo, which otherwise
    applies the process group's). Messages between two ranks are matched in order,
    so one thread per peer and direction loses nothing. For NCCL the caller posts
    (batched) and the thread only waits. :meth:`close` ends the thread."""

    def __init__(self, name: str, op: Callable[..., dist.Work] | None, peer: int,
                 timeout: float) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[Any], int, Pending] | None] = (
            queue.SimpleQueue()
        )
        self._op, self._peer = op, peer
        self._timeout = timedelta(seconds=timeout)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            items, tag, pending = job
            try:
                if self._op is None:  # already posted: items are works
                    works = items
                else:
                    works = [self._op([t], self._peer, tag) for t in items]
                for work in works:
                    work.wait(self._timeout)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                pending.error = exc
            pending.keep = None
            pending.event.set()

    def submit(self, items: list[Any], tag: int, pending: Pending) -> Pending:
        self._jobs.put((items, tag, pending))
        return pending

    def close(self, wait: float) -> bool:
        """Stop the thread once its queued messages are done; True if it ended within
        ``wait`` seconds."""
        self._jobs.put(None)
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
        pending = self._submit(tensors, peer, tag, send)
        op = _Op(peer, tag, send, tuple((tuple(t.shape), t.dtype) for t in tensors))
        self._ops.append((op, pending))
        return pending

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

    def wait(self, pending: Pending, what: str) -> None:
        """Complete ``pending``; fail after ``timeout`` seconds, or as soon as another rank
        reports a failure."""
        if not pending.event.is_set():
            deadline = time.monotonic() + self.timeout
            while not pending.event.wait(0.2):
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
        import pickle

        deadline = time.monotonic() + within
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
                if not pending.event.wait(max(0.0, deadline - time.monotonic())):
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
        backend = dist.get_backend(group)
        self.batched = backend == "nccl"
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are noticed by timeout only
            self.store = None
        self._channels: dict[tuple[int, bool], _Channel] = {}

    def _group(self) -> dist.ProcessGroup:
        if self._pg is None:
            raise PipelineError("this pipeline is closed")
        return self._pg

    def _channel(self, peer: int, send: bool) -> _Channel:
        channel = self._channels.get((peer, send))
        if channel is None:
            pg = self._group()
            # the process group's own send/recv (group ranks), without the Python
            # wrappers of torch.distributed.isend/irecv (about 20 us per call)
            op = None if self.batched else (pg.send if send else pg.recv)
            name = f"dualpipe-{'send-to' if send else 'recv-from'}-{peer}"
            channel = _Channel(name, op, self.group_ranks[peer], self.timeout)
            self._channels[(peer, send)] = channel
        return channel

    def _batched(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                 ) -> list[dist.Work]:
        op = dist.isend if send else dist.irecv
        try:
            return dist.batch_isend_irecv(
                [dist.P2POp(op, t, self.ranks[peer], self.group, tag) for t in tensors]
            )
        except RuntimeError as exc:
            self.check_error()
            raise PipelineError(f"communication failed: {exc}") from exc

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        pending = Pending(list(tensors) if send else None)
        if self.batched:
            works = self._batched(tensors, peer, tag, send)
            return self._channel(peer, send).submit(list(works), tag, pending)
        return self._channel(peer, send).submit(list(tensors), tag, pending)

    def _post_now(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                  ) -> Callable[[float], None]:
        if self.batched:
            works = self._batched(tensors, peer, tag, send)
        else:
            pg = self._group()
            op = pg.send if send else pg.recv
            works = [op([t], self.group_ranks[peer], tag) for t in tensors]

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
        """Stop the per-peer threads (once their messages are done) and drop the group."""
        for channel in self._channels.values():
            channel.close(wait=1.0)
        self._channels = {}
        self._pg = None
