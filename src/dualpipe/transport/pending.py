"""Completion handles of posted messages: in-process, device (NCCL) and gloo."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Pending", "DevicePending", "GlooPending"]

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
