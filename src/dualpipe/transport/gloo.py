"""The gloo transport's helper threads: large messages per peer, and the failure watch."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import RemoteFailure
from .pending import GlooPending

__all__ = ["LARGE_MESSAGE", "Issue", "LargeMessages", "FailureWatch"]

Issue = Callable[[list[torch.Tensor], int, int, bool], list[dist.Work]]
"""``issue(tensors, peer, tag, send)``: post the operations now, in order."""

LARGE_MESSAGE = 256 * 1024
"""With gloo, messages of at least this many bytes are handed to a thread per peer and
direction, which posts the sends and waits for both: gloo copies into the socket in
the posting thread, which would hold up compute, and large transfers measured faster
this way (``benchmarks/RESULTS.md``)."""


class LargeMessages:
    """A daemon thread for the large gloo messages with one peer in one direction: it
    posts each send (in issue order) and waits for each message (no other thread
    touches their works). Messages with one peer in one direction complete in order
    anyway, so one thread per peer and direction holds nothing up."""

    def __init__(self, issue: Issue, limit: timedelta, peer: int, send: bool) -> None:
        self._issue = issue
        self._limit = limit
        self._send = send
        self._jobs: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        name = f"dualpipe-{'send-to' if send else 'recv-from'}-{peer}"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, tensors: list[torch.Tensor], peer: int, tag: int,
               pending: GlooPending) -> None:
        self._jobs.put([tensors, peer, tag, pending])

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._run(job)

    def _run(self, job: list[Any]) -> None:
        """Post (a send) and complete one message. The thread lets go of the message's
        tensors before it marks the message delivered: whoever waited for it may then
        expect them freed."""
        tensors, peer, tag, pending = job
        job.clear()
        if self._send:
            try:
                pending.works = self._issue(tensors, peer, tag, True)
            except Exception as exc:  # noqa: BLE001 - handed to the waiter
                pending.error = exc
                pending.mark_done()
                return
        del tensors
        pending.complete(self._limit)

    def close(self, wait: float) -> bool:
        """Stop the thread once its queued messages are done; True if it ended in time."""
        self._jobs.put(None)
        self._thread.join(wait)
        return not self._thread.is_alive()


class FailureWatch:
    """A daemon thread that looks for a failure posted by another rank every ``period``
    seconds and, when one is, stops the transport from posting and completes the
    step's open messages (``fail``, e.g. :meth:`BaseTransport.notice_failure`): that wakes the main
    thread if it is waiting in gloo. :meth:`close` ends the thread."""

    def __init__(self, poll: Callable[[], str | None], fail: Callable[[str], None],
                 period: float = 0.2) -> None:
        self._poll = poll
        self._fail = fail
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dualpipe-failure-watch",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            try:
                message = self._poll()
            except RemoteFailure as exc:
                message = str(exc)
            if message is not None:
                self._fail(message)
                return

    def close(self, wait: float) -> bool:
        """Stop the thread; True if it ended within ``wait`` seconds."""
        self._stop.set()
        self._thread.join(wait)
        return not self._thread.is_alive()
