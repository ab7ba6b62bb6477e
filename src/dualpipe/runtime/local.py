"""An in-process transport: every rank of a pipeline in one process (one thread per
rank), messages handed over in memory. For unit tests of the executor.

    network = LocalNetwork(num_ranks=2)
    results = network.run(lambda rank, transport: executor_for(rank, transport).run(...))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from .p2p import BaseTransport, Pending, PipelineError

__all__ = ["LocalNetwork", "LocalTransport"]

T = TypeVar("T")


class LocalNetwork:
    """The mailboxes shared by the ranks of one in-process pipeline.

    A message is ``(src, dst, tag)``; a send completes when its receive is posted
    (the tensors are copied then), like a rendezvous. A second message with the same
    ``(src, dst, tag)`` while the first is unmatched is an error: tags must tell
    messages apart.
    """

    def __init__(self, num_ranks: int, timeout: float = 10.0) -> None:
        self.num_ranks = num_ranks
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sends: dict[tuple[int, int, int], tuple[list[torch.Tensor], Pending]] = {}
        self._recvs: dict[tuple[int, int, int], tuple[list[torch.Tensor], Pending]] = {}
        self.error: str | None = None
        self.notes: dict[str, bytes] = {}
        self.delivered = 0

    def transport(self, rank: int) -> LocalTransport:
        """The transport of pipeline rank ``rank``."""
        return LocalTransport(self, rank)

    def _match(self, key: tuple[int, int, int], tensors: list[torch.Tensor], send: bool,
               pending: Pending) -> None:
        with self._lock:
            mine, theirs = (self._sends, self._recvs) if send else (self._recvs, self._sends)
            if key in mine:
                raise PipelineError(f"two messages in flight with the same (src, dst, tag) {key}")
            other = theirs.pop(key, None)
            if other is None:
                mine[key] = (tensors, pending)
                return
            self.delivered += 1
        sent, recv = (tensors, other[0]) if send else (other[0], tensors)
        if len(sent) != len(recv) or any(
            a.shape != b.shape or a.dtype != b.dtype for a, b in zip(sent, recv, strict=False)
        ):
            err = PipelineError(f"message {key}: sent {[tuple(t.shape) for t in sent]} into "
                                f"buffers {[tuple(t.shape) for t in recv]}")
            for p in (pending, other[1]):
                p.error = err
        else:
            for a, b in zip(sent, recv, strict=True):
                b.copy_(a)
        for p in (pending, other[1]):
            p.keep = None
            p.event.set()

    @property
    def unmatched(self) -> int:
        """Messages posted on one side only."""
        with self._lock:
            return len(self._sends) + len(self._recvs)

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
            if not pending.event.wait(seconds):
                raise PipelineError(f"message {tag} to/from rank {peer} did not complete")

        return wait

    def _publish(self, name: str, value: bytes) -> None:
        self.network.notes[f"{self.pipeline}/{name}"] = value

    def _read(self, name: str) -> bytes | None:
        return self.network.notes.get(f"{self.pipeline}/{name}")

    def post_error(self, message: str) -> None:
        """Tell every rank that this step failed."""
        self.network.error = message

    def _posted_error(self) -> str | None:
        return self.network.error
