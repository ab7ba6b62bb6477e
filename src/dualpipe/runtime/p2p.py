"""Point-to-point transport over ``torch.distributed``: headers, posting, bounded waits.

* Tensor metadata travels in a fixed-size int64 *header* so receivers never need
  declared shapes.
* Sends and receives are non-blocking; NCCL gets them through
  ``batch_isend_irecv`` (its point-to-point operations are matched by order), other
  backends through ``isend``/``irecv`` with the message number as tag.
* Waits are bounded: a waiting rank gives up after ``timeout`` seconds, and
  notices within a fraction of a second when another rank has posted a failure
  to the process group's store.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "HEADER_LEN",
    "TensorMeta",
    "encode_header",
    "decode_header",
    "PipelineError",
    "RemoteFailure",
    "Transport",
    "Pending",
]

HEADER_LEN = 128
Post = tuple[torch.Tensor, int, int]
"""A point-to-point operation: (tensor, peer pipeline rank, tag)."""
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
    """Completion of one posted operation, watched by a background thread.

    ``keep`` holds tensors that must live until the operation completes (send
    buffers); the watcher drops them as soon as it does."""

    __slots__ = ("work", "event", "error", "keep")

    def __init__(self, work: dist.Work, keep: list[torch.Tensor] | None = None) -> None:
        self.work = work
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.keep = keep

    @property
    def done(self) -> bool:
        return self.event.is_set()


class _Watcher:
    """A daemon thread that completes operations in the order they were posted.

    gloo's ``Work.is_completed()`` only turns true inside ``wait()``, and its
    ``wait(timeout)`` breaks the connection when it expires; so one thread per peer and
    direction blocks in ``wait()`` for each operation in turn (operations between two
    ranks complete in posting order) and sets an event the moment it is done. The
    main thread then finds most messages already complete, and can still wait with
    a deadline."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            pending = self._jobs.get()
            try:
                pending.work.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                pending.error = exc
            pending.keep = None
            pending.event.set()

    def watch(self, pending: Pending) -> Pending:
        self._jobs.put(pending)
        return pending


class Transport:
    """Non-blocking point-to-point messages between pipeline ranks.

    Args:
        group: process group (None = default).
        ranks: global rank of each pipeline rank.
        device: where messages live (CPU for gloo, the GPU for NCCL).
        timeout: seconds a wait may last before the step fails.
        error_key: key in the process group's store where failures are posted.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        ranks: Sequence[int],
        device: torch.device,
        timeout: float,
        error_key: str,
    ) -> None:
        self.group = group
        self.ranks = list(ranks)
        self.device = device
        self.timeout = timeout
        self.error_key = error_key
        backend = dist.get_backend(group)
        self.batched = backend == "nccl"
        try:
            self.store: dist.Store | None = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are noticed by timeout only
            self.store = None
        self._watchers: dict[tuple[int, bool], _Watcher] = {}
        self._sends: list[Pending] = []

    def post(self, sends: Sequence[Post], recvs: Sequence[Post]) -> list[dist.Work]:
        """Post ``(tensor, peer pipeline rank, tag)`` sends and receives; returns their works
        in order (sends first)."""
        if not sends and not recvs:
            return []
        try:
            return self._post(sends, recvs)
        except RuntimeError as exc:
            self.check_error()
            raise PipelineError(f"communication failed: {exc}") from exc

    def _post(self, sends: Sequence[Post], recvs: Sequence[Post]) -> list[dist.Work]:
        if self.batched:
            g, r = self.group, self.ranks
            ops = [dist.P2POp(dist.isend, t, r[p], g, tag) for t, p, tag in sends]
            ops += [dist.P2POp(dist.irecv, t, r[p], g, tag) for t, p, tag in recvs]
            return list(dist.batch_isend_irecv(ops))
        works = [dist.isend(t, self.ranks[p], self.group, tag) for t, p, tag in sends]
        works += [dist.irecv(t, self.ranks[p], self.group, tag) for t, p, tag in recvs]
        return works

    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed."""
        if self.store is not None:
            try:
                self.store.set(self.error_key, message)
            except Exception:  # noqa: BLE001, S110 - best effort while failing
                pass

    def check_error(self) -> None:
        """Raise if another rank posted a failure."""
        if self.store is None:
            return
        try:
            failed = self.store.check([self.error_key])
            message = self.store.get(self.error_key).decode() if failed else ""
        except Exception as exc:  # noqa: BLE001 - the store went away with its host rank
            raise RemoteFailure(
                f"lost the process group's store ({type(exc).__name__}); the rank hosting it "
                "has probably failed and exited"
            ) from exc
        if failed:
            raise RemoteFailure(message)

    def watch(self, work: dist.Work, peer: int, send: bool, keep: list | None = None) -> Pending:
        """Track completion of a posted operation with ``peer`` in the background."""
        key = (peer, send)
        watcher = self._watchers.get(key)
        if watcher is None:
            watcher = self._watchers[key] = _Watcher(
                f"dualpipe-{'send' if send else 'recv'}-{peer}"
            )
        pending = watcher.watch(Pending(work, keep))
        if send:
            self._sends.append(pending)
        return pending

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
        """Bytes of posted sends not yet complete (their buffers are still held)."""
        self._sends = [p for p in self._sends if not p.done]
        return sum(t.nbytes for p in self._sends for t in (p.keep or ()))

    def drain_sends(self, what: str) -> None:
        """Wait until every posted send has completed."""
        for pending in self._sends:
            self.wait(pending, what)
        self._sends = []

    def wait_work(self, work: dist.Work, peer: int, what: str) -> None:
        """Post-and-wait helper for one-off exchanges: complete ``work`` with a deadline."""
        self.wait(self.watch(work, peer, send=False), what)
