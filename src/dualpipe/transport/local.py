"""An in-process transport: every rank of a pipeline in one process (one thread per rank),
messages handed over in memory. For unit tests of the executor."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import PipelineError
from .base import BaseTransport
from .pending import Pending

__all__ = ["LocalNetwork", "LocalTransport"]

T = TypeVar("T")


@dataclass
class _Issued:
    """One operation issued in in-order mode."""

    rank: int
    peer: int
    send: bool
    tag: int
    tensors: list[torch.Tensor]
    pending: Pending

    def __str__(self) -> str:
        return (f"rank {self.rank}: {'send to' if self.send else 'recv from'} {self.peer} "
                f"tag {self.tag:#x}")


class LocalNetwork:
    """The mailboxes shared by the ranks of one in-process pipeline.

    A message is ``(src, dst, tag)``; a send completes when its receive is posted
    (the tensors are copied then), like a rendezvous. A second message with the same
    ``(src, dst, tag)`` while the first is unmatched is an error: tags must tell
    messages apart.

    ``in_order`` makes the network behave like NCCL, which ignores tags and runs the
    operations of a rank in the order it issued them: with ``"peer"``, one queue per
    rank and peer (NCCL's point-to-point communicator per pair of ranks); with
    ``"rank"``, one queue per rank for all peers (a single communicator), the stricter
    rule. An operation completes only when it is first in its queue and its
    counterpart is first in the peer's queue; two heads that face each other but are
    different messages are a *violation* (NCCL would pair them: wrong data), recorded
    in :attr:`violations` and failing both. Every rank's issued operations are
    recorded in :attr:`issued`, in order, as ``(peer, send, tag)``.
    """

    def __init__(self, num_ranks: int, timeout: float = 10.0, in_order: str | None = None
                 ) -> None:
        if in_order not in (None, "peer", "rank"):
            raise ValueError(f"in_order must be None, 'peer' or 'rank', not {in_order!r}")
        self.num_ranks = num_ranks
        self.timeout = timeout
        self.in_order = in_order
        self._lock = threading.Lock()
        self._sends: dict[tuple[int, int, int], tuple[list[torch.Tensor], Pending]] = {}
        self._recvs: dict[tuple[int, int, int], tuple[list[torch.Tensor], Pending]] = {}
        self._queues: dict[tuple[int, int], deque[_Issued]] = {}
        self.issued: list[list[tuple[int, bool, int]]] = [[] for _ in range(num_ranks)]
        self.violations: list[str] = []
        self.error: str | None = None
        self.notes: dict[str, bytes] = {}
        self.delivered = 0

    # ------------------------------------------------------------ in-order mode
    def _queue_key(self, rank: int, peer: int) -> tuple[int, int]:
        return (rank, peer) if self.in_order == "peer" else (rank, -1)

    def _enqueue(self, op: _Issued) -> None:
        with self._lock:
            self.issued[op.rank].append((op.peer, op.send, op.tag))
            self._queues.setdefault(self._queue_key(op.rank, op.peer), deque()).append(op)
            done = self._progress()
        for a, b in done:
            self._deliver(a, b)

    def _progress(self) -> list[tuple[_Issued, _Issued]]:
        """Pair the queue heads that face each other (under the lock); returns the pairs
        to deliver (outside it)."""
        done: list[tuple[_Issued, _Issued]] = []
        moved = True
        while moved:
            moved = False
            for queue in list(self._queues.values()):
                if not queue:
                    continue
                head = queue[0]
                other = self._queues.get(self._queue_key(head.peer, head.rank))
                if not other:
                    continue
                peer_head = other[0]
                if peer_head.peer != head.rank or peer_head.send == head.send:
                    continue  # the peer is busy with something else: head waits
                queue.popleft()
                other.popleft()
                moved = True
                if peer_head.tag != head.tag:
                    message = f"NCCL would pair {head} with {peer_head}"
                    self.violations.append(message)
                    for op in (head, peer_head):
                        op.pending.error = PipelineError(message)
                        op.pending.mark_done()
                    continue
                self.delivered += 1
                done.append((head, peer_head) if head.send else (peer_head, head))
        return done

    def _deliver(self, send: _Issued, recv: _Issued) -> None:
        self._copy(send.tensors, recv.tensors, (send.rank, recv.rank, send.tag),
                   send.pending, recv.pending)

    def heads(self) -> list[str]:
        """The first waiting operation of every queue (what a stuck network waits on)."""
        with self._lock:
            return [str(q[0]) for q in self._queues.values() if q]

    def transport(self, rank: int) -> LocalTransport:
        """The transport of pipeline rank ``rank``."""
        return LocalTransport(self, rank)

    def _match(self, key: tuple[int, int, int], tensors: list[torch.Tensor], send: bool,
               pending: Pending) -> None:
        if self.in_order is not None:
            rank, peer = (key[0], key[1]) if send else (key[1], key[0])
            self._enqueue(_Issued(rank, peer, send, key[2], tensors, pending))
            return
        with self._lock:
            mine, theirs = (self._sends, self._recvs) if send else (self._recvs, self._sends)
            if key in mine:
                raise PipelineError(f"two messages in flight with the same (src, dst, tag) {key}")
            other = theirs.pop(key, None)
            if other is None:
                mine[key] = (tensors, pending)
                return
            self.delivered += 1
        if send:
            self._copy(tensors, other[0], key, pending, other[1])
        else:
            self._copy(other[0], tensors, key, other[1], pending)

    @staticmethod
    def _copy(sent: list[torch.Tensor], recv: list[torch.Tensor], key: tuple[int, int, int],
              send_pending: Pending, recv_pending: Pending) -> None:
        """Copy a matched message into its receive buffers and complete both sides."""
        if len(sent) != len(recv) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(sent, recv, strict=False)
        ):
            err = PipelineError(f"message {key}: sent {[tuple(t.shape) for t in sent]} into "
                                f"buffers {[tuple(t.shape) for t in recv]}")
            for p in (send_pending, recv_pending):
                p.error = err
        else:
            for a, b in zip(sent, recv, strict=True):
                b.copy_(a)
        for p in (send_pending, recv_pending):
            p.mark_done()

    @property
    def unmatched(self) -> int:
        """Messages posted on one side only."""
        with self._lock:
            queued = sum(len(q) for q in self._queues.values())
            return len(self._sends) + len(self._recvs) + queued

    def run(self, fn: Callable[[int, LocalTransport], T], timeout: float | None = None
            ) -> list[T]:
        """Run ``fn(rank, transport)`` for every rank on its own thread; returns the
        results in rank order, or raises the first rank's exception (all ranks are given
        ``timeout`` seconds in all)."""
        results: list[Any] = [None] * self.num_ranks
        errors: list[BaseException | None] = [None] * self.num_ranks

        def body(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.transport(rank))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                errors[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), daemon=True)
                   for r in range(self.num_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout if timeout is not None else 3 * self.timeout)
        stuck = [r for r, t in enumerate(threads) if t.is_alive()]
        if stuck:
            raise TimeoutError(f"ranks {stuck} did not finish")
        for exc in errors:
            if exc is not None:
                raise exc
        return results


class LocalTransport(BaseTransport):
    """One rank's view of a :class:`LocalNetwork`."""

    def __init__(self, network: LocalNetwork, rank: int) -> None:
        super().__init__(rank, network.num_ranks, torch.device("cpu"), network.timeout)
        self.network = network

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        pending = Pending(list(tensors) if send else None)
        key = (self.rank, peer, tag) if send else (peer, self.rank, tag)
        self.network._match(key, list(tensors), send, pending)
        return pending

    def _post_now(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
                  ) -> Callable[[float], None]:
        pending = self._submit(tensors, peer, tag, send)

        def wait(seconds: float) -> None:
            if not pending.wait_for(seconds):
                raise PipelineError(f"message {tag} to/from rank {peer} did not complete")

        return wait

    def _publish(self, name: str, value: bytes) -> None:
        self.network.notes[f"{self.pipeline}/{name}"] = value

    def _read(self, name: str) -> bytes | None:
        return self.network.notes.get(f"{self.pipeline}/{name}")

    def _forget(self, name: str) -> None:
        self.network.notes.pop(f"{self.pipeline}/{name}", None)

    def _publish_error(self, message: str) -> None:
        if self.network.error is None:
            self.network.error = message

    def posted_error(self) -> str | None:
        return self.network.error
