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

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

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


class PipelineError(RuntimeError):
    """A pipeline step failed on some rank (or timed out waiting for one)."""


class RemoteFailure(PipelineError):
    """Another rank's failure, as read from the process group's store."""


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
    only turns true inside ``wait()`` and its ``wait(timeout)`` breaks the connection
    when it expires, a thread blocking in ``wait()`` is the way to learn of
    completion at once while the main thread still waits with a deadline. Messages
    between two ranks are matched in order, so one thread per peer and direction
    loses nothing. For NCCL the caller posts (batched) and the thread only waits."""

    def __init__(self, name: str, op: Callable[..., dist.Work] | None, peer: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[Any], int, Pending]] = queue.SimpleQueue()
        self._op, self._peer = op, peer
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            items, tag, pending = self._jobs.get()
            try:
                if self._op is None:  # already posted: items are works
                    works = items
                else:
                    works = [self._op([t], self._peer, tag) for t in items]
                for work in works:
                    work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                pending.error = exc
            pending.keep = None
            pending.event.set()

    def submit(self, items: list[Any], tag: int, pending: Pending) -> Pending:
        self._jobs.put((items, tag, pending))
        return pending


class BaseTransport:
    """Non-blocking messages between the ranks of one pipeline, with bounded waits.

    Subclasses post messages (:meth:`_submit`) and share failures
    (:meth:`post_error`, :meth:`_posted_error`); the waiting, draining and
    swapping logic lives here once.

    Attributes:
        device: where message tensors live.
        timeout: seconds a wait may last before the step fails.
    """

    def __init__(self, device: torch.device, timeout: float) -> None:
        self.device = device
        self.timeout = timeout
        self._sends: list[Pending] = []

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        raise NotImplementedError

    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed."""
        raise NotImplementedError

    def _posted_error(self) -> str | None:
        """The failure another rank posted, if any."""
        raise NotImplementedError

    def check_error(self) -> None:
        """Raise :class:`RemoteFailure` if another rank posted a failure."""
        message = self._posted_error()
        if message is not None:
            raise RemoteFailure(message)

    def send(self, tensors: Sequence[torch.Tensor], peer: int, tag: int) -> Pending:
        """Send ``tensors`` (one message) to pipeline rank ``peer``; returns at once. The
        tensors are kept alive until delivered."""
        pending = self._submit(list(tensors), peer, tag, send=True)
        self._sends.append(pending)
        return pending

    def recv(self, buffers: Sequence[torch.Tensor], peer: int, tag: int) -> Pending:
        """Receive one message from pipeline rank ``peer`` into ``buffers``; returns at
        once. Complete it with :meth:`wait`."""
        return self._submit(list(buffers), peer, tag, send=False)

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

    def exchange(self, tensor: torch.Tensor, peer: int, tag: int, what: str) -> torch.Tensor:
        """Swap a tensor of the same shape with ``peer`` (blocking, with a deadline)."""
        other = torch.empty_like(tensor)
        incoming = self.recv([other], peer, tag)
        outgoing = self.send([tensor], peer, tag)
        self.wait(incoming, what)
        self.wait(outgoing, what)
        self._sends.remove(outgoing)
        return other


class Transport(BaseTransport):
    """Point-to-point messages over a ``torch.distributed`` process group.

    Args:
        group: process group (None = default).
        group_ranks: rank in ``group`` of each pipeline rank.
        device: where messages live (CPU for gloo, the GPU for NCCL).
        timeout: seconds a wait may last before the step fails.
        error_key: key in the process group's store where failures are posted.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        group_ranks: Sequence[int],
        device: torch.device,
        timeout: float,
        error_key: str,
    ) -> None:
        super().__init__(device, timeout)
        self.group = group
        self._pg = group if group is not None else dist.distributed_c10d._get_default_group()
        self.group_ranks = list(group_ranks)
        self.ranks = [dist.get_global_rank(self._pg, g) for g in self.group_ranks]
        self.error_key = error_key
        backend = dist.get_backend(group)
        self.batched = backend == "nccl"
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are noticed by timeout only
            self.store = None
        self._channels: dict[tuple[int, bool], _Channel] = {}

    def _channel(self, peer: int, send: bool) -> _Channel:
        channel = self._channels.get((peer, send))
        if channel is None:
            # the process group's own send/recv (group ranks), without the Python
            # wrappers of torch.distributed.isend/irecv (about 20 us per call)
            op = None if self.batched else (self._pg.send if send else self._pg.recv)
            name = f"dualpipe-{'send-to' if send else 'recv-from'}-{peer}"
            channel = _Channel(name, op, self.group_ranks[peer])
            self._channels[(peer, send)] = channel
        return channel

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        pending = Pending(list(tensors) if send else None)
        if self.batched:
            op = dist.isend if send else dist.irecv
            try:
                works = dist.batch_isend_irecv(
                    [dist.P2POp(op, t, self.ranks[peer], self.group, tag) for t in tensors]
                )
            except RuntimeError as exc:
                self.check_error()
                raise PipelineError(f"communication failed: {exc}") from exc
            return self._channel(peer, send).submit(list(works), tag, pending)
        return self._channel(peer, send).submit(list(tensors), tag, pending)

    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed."""
        if self.store is not None:
            try:
                self.store.set(self.error_key, message)
            except Exception:  # noqa: BLE001, S110 - best effort while failing
                pass

    def _posted_error(self) -> str | None:
        if self.store is None:
            return None
        try:
            failed = self.store.check([self.error_key])
            return self.store.get(self.error_key).decode() if failed else None
        except Exception as exc:  # noqa: BLE001 - the store went away with its host rank
            raise RemoteFailure(
                f"lost the process group's store ({type(exc).__name__}); the rank hosting it "
                "has probably failed and exited"
            ) from exc
