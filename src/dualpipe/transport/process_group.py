"""Point-to-point messages over a ``torch.distributed`` process group (gloo, NCCL)."""

from __future__ import annotations

import base64
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PipelineError, RemoteFailure
from .base import BaseTransport
from .gloo import LARGE_MESSAGE, FailureWatch, LargeMessages
from .pending import DevicePending, GlooPending, Pending

__all__ = ["Transport", "POLL_PERIOD", "JOB_FAILURES"]

JOB_FAILURES = "dualpipe/job/failures"
"""Store key counting the failures of every pipeline of the job (one failure domain): each
pipeline's failure watch reads it, so a failure reaches the data-, tensor- and
expert-parallel peers of every pipeline, not only the failed pipeline's ranks."""

POLL_PERIOD = 0.2
"""Seconds between two looks at the store for another rank's failure."""

class Transport(BaseTransport):
    """Point-to-point messages over a ``torch.distributed`` process group.

    Args:
        group: process group (None = default).
        group_ranks: rank in ``group`` of each pipeline rank.
        rank: this pipeline rank.
        device: where messages live (CPU for gloo, the GPU for NCCL).
        timeout: seconds a wait may last before the step fails.
    """

    large_message = LARGE_MESSAGE
    """With gloo, messages of at least this many bytes go to a thread per peer and direction."""

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
        self._watch: FailureWatch | None = None
        self._next_poll = 0.0  # when a polling loop may ask the store again
        # the job's failures so far: only later ones concern this pipeline (a pipeline
        # rebuilt after a failure starts clean)
        self._job_seen = self._job_failures()
        self._job_failed = False  # this pipeline failed because another one did
        # per (peer, send): made at the first large message
        self._large: dict[tuple[int, bool], LargeMessages] = {}
        self._limit = timedelta(seconds=timeout)  # gloo's wait limit: the pipeline's timeout
        self._issued = 0  # operations posted (their order, for sends to be completed)
        self._unmatched: dict[int, deque[GlooPending]] = {}  # per peer: sends not waited

    def _group(self) -> dist.ProcessGroup:
        if self._pg is None:
            raise PipelineError("this pipeline is closed")
        return self._pg

    def issue(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool
               ) -> list[dist.Work]:
        """Post the operations now, from this thread, in order (the process group's own
        send/recv, with group ranks: no Python wrapper, about 20 us less per call)."""
        pg = self._group()
        op = pg.send if send else pg.recv
        try:
            return [op([t], self.group_ranks[peer], tag) for t in tensors]
        except RuntimeError as exc:
            self.check_error(fresh=True)
            raise PipelineError(f"communication failed: {exc}") from exc

    def _submit(self, tensors: list[torch.Tensor], peer: int, tag: int, send: bool) -> Pending:
        keep = list(tensors) if send else None
        if self.device_backend:
            return DevicePending(self.issue(tensors, peer, tag, send), keep)
        if self._watch is None and self.store is not None:
            self._watch = FailureWatch(self.posted_error, self.notice_failure, POLL_PERIOD)
        self._issued += 1
        if sum(t.nbytes for t in tensors) >= self.large_message:
            # a receive is posted here (in order), a send by the thread; it waits for both
            works = [] if send else self.issue(tensors, peer, tag, send)
            pending = GlooPending(works, keep, peer, self._issued)
            pending.claim()
            helper = self._large.get((peer, send))
            if helper is None:
                helper = LargeMessages(self.issue, self._limit, peer, send)
                self._large[(peer, send)] = helper
            helper.submit(list(tensors), peer, tag, pending)
            return pending
        works = self.issue(tensors, peer, tag, send)
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
        works = self.issue(tensors, peer, tag, send)

        def wait(seconds: float) -> None:
            for work in works:
                work.wait(timedelta(seconds=seconds))

        return wait

    def _publish_error(self, message: str) -> None:
        if self.store is None:
            return
        try:
            key = f"{self.key}/error"
            if not self._job_failed and self._failure is None and not self.store.check([key]):
                # this pipeline's first failure, and not one it heard of: the job's too
                # (first, so that a rank that learns of it and rebuilds sees it counted)
                me = dist.get_rank()
                n = self.store.add(JOB_FAILURES, 1)
                self.store.set(f"{JOB_FAILURES}/{n}",
                               f"process {me} (pipeline rank {self.rank}) failed: {message}")
                self._job_seen = max(self._job_seen, n)
            # set only if absent: the first failure of the pipeline stays
            self.store.compare_set(key, "", message)
        except Exception:  # noqa: BLE001, S110 - best effort while failing
            pass

    def _job_failures(self) -> int:
        """How many failures the job's pipelines have posted (0 without a store)."""
        if self.store is None:
            return 0
        try:
            return int(self.store.add(JOB_FAILURES, 0))
        except Exception:  # noqa: BLE001 - no job count: the pipeline's own key still works
            return 0

    def _job_failure(self) -> str | None:
        """A failure another pipeline of the job posted since this one was built."""
        n = self._job_failures()
        if n <= self._job_seen:
            return None
        key = f"{JOB_FAILURES}/{self._job_seen + 1}"
        try:  # set right after the count: wait a moment for it
            assert self.store is not None
            self.store.wait([key], timedelta(seconds=2))
            message = self.store.get(key).decode()
        except Exception:  # noqa: BLE001 - the poster died in between
            message = "another pipeline of this job failed (its message was lost)"
        self._job_failed = True
        return message

    def _poll_error(self) -> str | None:
        """While the failure watch runs, it asks the store (every 0.2 s) and records what
        it finds, so a polling loop asks nothing; otherwise at most every 0.2 s."""
        if self._watch is not None:
            return None
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_PERIOD
        return self.posted_error()

    def posted_error(self) -> str | None:
        if self.store is None:
            return None
        key = f"{self.key}/error"
        try:
            if self.store.check([key]):
                return self.store.get(key).decode()
            return self._job_failure()
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

    def _forget(self, name: str) -> None:
        if self.store is not None:
            try:
                self.store.delete_key(f"{self.key}/{name}")
            except Exception:  # noqa: BLE001, S110 - nothing to free on a gone store
                pass

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
