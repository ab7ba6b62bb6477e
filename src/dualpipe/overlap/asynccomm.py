"""Communication parts: an asynchronous operation with its backward, and a call of one.

A :class:`AsyncComm` launches its work without waiting (``async_op=True``) and hands back
a :class:`InFlight`; the engine waits on it only when the next part needs the result.
"""

from __future__ import annotations

import copy
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["AsyncComm", "CommCall", "InFlight", "FUTURE_LAG"]


FUTURE_LAG = 1.0
"""Seconds a timed :class:`InFlight` waits, after its handles' ``wait()`` returned, for
their futures to report completion (they normally have already)."""


def _future(work: Any) -> Any:
    """``work.get_future()``, or a :class:`TypeError` saying what to do."""
    advice = ("the overlap engine times each communication by its handles' futures; "
              "return handles with get_future() (torch.distributed's async_op=True works "
              "of collectives have one), or pass InFlight(..., timed=False) to record no "
              "communication interval for this work")
    getter = getattr(work, "get_future", None)
    if getter is None:
        raise TypeError(f"InFlight: a handle of type {type(work).__name__} has no "
                        f"get_future(): {advice}")
    try:
        future = getter()
    except RuntimeError as exc:  # e.g. "Work::getFuture not implemented." (gloo send/recv)
        raise TypeError(f"InFlight: the get_future() of a handle of type "
                        f"{type(work).__name__} failed ({exc}): {advice}") from exc
    if not callable(getattr(future, "add_done_callback", None)):
        raise TypeError(f"InFlight: the get_future() of a handle of type "
                        f"{type(work).__name__} returned a {type(future).__name__}, which "
                        f"has no add_done_callback(): {advice}")
    return future


class InFlight:
    """Work in flight: the handles to wait on and how to produce the result from them.

    Args:
        works: handles with ``is_completed()``, ``wait()`` and, unless ``timed`` is
            False, ``get_future()`` (what ``torch.distributed`` returns with
            ``async_op=True``); an empty list means "already done".
        finish: called once after every handle completed; returns the result tensors.
        device_side: ``wait`` does not block the host (see :attr:`device_side`).
        timed: the engine's timeline records the communication from its launch until
            the moment its handles' futures completed (:attr:`completed_at`), so every
            handle must have ``get_future()``; a handle without one is refused with a
            :class:`TypeError`. ``False``: the handles need no ``get_future()`` and the
            engine records no communication interval for this work (it would only know
            when it looked, not when the work completed).

    Raises:
        TypeError: ``timed`` and a handle has no working ``get_future()``.
    """

    __slots__ = ("_works", "_finish", "_result", "device_side", "timed", "_futures",
                 "_done_at", "_all_done")

    def __init__(self, works: Sequence[Any], finish: Callable[[], tuple[Tensor, ...]],
                 device_side: bool = False, timed: bool = True) -> None:
        self._works = list(works)
        self._finish = finish
        self._result: tuple[Tensor, ...] | None = None
        self.device_side = device_side
        """True when ``wait`` does not block the host (it orders accelerator streams, as
        NCCL's does): the engine then never polls it."""
        self.timed = timed
        """Whether :attr:`completed_at` tells when the work completed (see the class)."""
        self._futures: list[Any] = []
        self._done_at: list[float] = []
        self._all_done = threading.Event()  # set when every future completed
        if not timed:
            return
        if not self._works:  # nothing to wait for: done when made
            self._done_at.append(time.perf_counter())
            return
        for w in self._works:
            self._futures.append(_future(w))
        for f in self._futures:
            f.add_done_callback(self._note)

    def _note(self, _future: Any) -> None:
        self._done_at.append(time.perf_counter())
        if len(self._done_at) == len(self._futures):
            self._all_done.set()

    def settle(self, seconds: float) -> bool:
        """Block the calling thread, without using the CPU, until the handles' futures
        completed or ``seconds`` passed; ``False`` at once when there is nothing to block
        on (not :attr:`timed`, or no handles): then poll :meth:`ready` instead."""
        if not self._futures:
            return False
        self._all_done.wait(seconds)
        return True

    @property
    def completed_at(self) -> float | None:
        """``time.perf_counter()`` when the work completed (the last of its handles'
        futures); ``None`` before that, and always when not :attr:`timed`."""
        if self.timed and len(self._done_at) == max(1, len(self._futures)):
            return max(self._done_at)
        return None

    def ready(self) -> bool:
        """Whether waiting now would not block the host: the handles' futures completed
        (a handle may report ``is_completed()`` a moment later: its thread still runs
        the futures' callbacks), or every handle reports ``is_completed()``. Handles must
        report completion that way without a ``wait()`` (gloo's all-to-all, all-reduce
        and all-gather do; its reduce-scatter does not)."""
        return (self.device_side or self._result is not None or self._all_done.is_set()
                or all(w.is_completed() for w in self._works))

    def wait(self) -> tuple[Tensor, ...]:
        """Block until done; the result tensors (the same tuple on every call). When
        :attr:`timed` and not :attr:`device_side`, :attr:`completed_at` is known once
        this returns (on the device side the host must not wait for it: the engine then
        records the communication only if its futures have reported by then).

        Raises:
            RuntimeError: a timed handle's future did not complete within
                :data:`FUTURE_LAG` seconds after the handle's ``wait()`` returned.
        """
        if self._result is None:
            for w in self._works:
                w.wait()
            self._works = []
            if self.timed and not self.device_side and self.completed_at is None:
                self._await_futures()
            self._result = self._finish()
        return self._result

    def _await_futures(self) -> None:
        """The handles are done; their futures' callbacks may still be on their way
        (a future runs its callbacks after it reports done)."""
        deadline = time.perf_counter() + FUTURE_LAG
        while self.completed_at is None:
            if time.perf_counter() > deadline:
                missing = len(self._futures) - len(self._done_at)
                raise RuntimeError(
                    f"InFlight: {missing} of {len(self._futures)} handles' futures did not "
                    f"complete within {FUTURE_LAG:g} s after the handles' wait() returned, "
                    "so the work's completion time is unknown; make get_future() complete "
                    "with the work, or pass InFlight(..., timed=False)")
            time.sleep(1e-4)


class AsyncComm(ABC):
    """Base of a communication part: an asynchronous operation and its backward.

    Subclasses implement :meth:`launch` and :meth:`launch_backward`; both must start
    their work and return at once. Each call gets its own ``ctx`` dict: the keyword
    arguments of the call (e.g. split sizes), plus whatever :meth:`launch` stores for
    :meth:`launch_backward`. Every rank of the group must make the same calls in the same
    order (as with any collective). Calling the operation, ``op(x, ...)``, makes a
    :class:`CommCall` to ``yield`` from a :class:`~dualpipe.overlap.PartedStage`.

    The :class:`InFlight` they return needs handles with ``get_future()`` (the engine
    times each communication by it), unless made with ``timed=False``.
    """

    @abstractmethod
    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        """Start the operation on ``inputs`` (detached); the InFlight gives its outputs."""

    @abstractmethod
    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        """Start the backward: from the outputs' gradients (zeros where none reached) to
        the inputs' gradients, one per input."""

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncComm:
        # configuration only: a deep copy of a stage shares its process groups
        return copy.copy(self)

    def __call__(self, *inputs: Tensor, **kwargs: Any) -> CommCall:
        return CommCall(self, inputs, kwargs)

    def __repr__(self) -> str:
        return type(self).__name__


class CommCall:
    """One call of a communication part: the operation, its input tensors and options."""

    __slots__ = ("op", "inputs", "ctx")

    def __init__(self, op: AsyncComm, inputs: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError(f"{op!r} takes one or more tensors")
        self.op = op
        self.inputs = inputs
        self.ctx = dict(kwargs)

    def __repr__(self) -> str:
        return f"{self.op!r}({len(self.inputs)} tensors)"


class _Synchronous(torch.autograd.Function):
    """A communication call as an ordinary autograd operation (launch, then wait)."""

    @staticmethod
    def forward(ctx: Any, call: CommCall, *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.call = call
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in inputs]
        out = call.op.launch(tuple(t.detach() for t in inputs), call.ctx).wait()
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        call: CommCall = ctx.call
        # materialized by autograd (zeros where none reached)
        full = tuple(g.contiguous() for g in grads if g is not None)
        in_grads = call.op.launch_backward(full, call.ctx).wait()
        return (None, *in_grads)


def run_synchronously(call: CommCall) -> tuple[Tensor, ...]:
    """Run ``call`` as an ordinary autograd operation (what a plain ``forward`` does)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in call.inputs):
        return tuple(_Synchronous.apply(call, *call.inputs))
    return tuple(call.op.launch(tuple(t.detach() for t in call.inputs), call.ctx).wait())
