"""Communication parts: an asynchronous operation with its backward, and a call of one.

A :class:`AsyncComm` launches its work without waiting (``async_op=True``) and hands back
a :class:`InFlight`; the engine waits on it only when the next part needs the result.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["AsyncComm", "CommCall", "InFlight"]


class InFlight:
    """Work in flight: the handles to wait on and how to produce the result from them.

    Args:
        works: handles with ``is_completed()`` and ``wait()`` (what ``torch.distributed``
            returns with ``async_op=True``); an empty list means "already done".
        finish: called once after every handle completed; returns the result tensors.
    """

    __slots__ = ("_works", "_finish", "_result", "device_side", "_total", "_done_at")

    def __init__(self, works: Sequence[Any], finish: Callable[[], tuple[Tensor, ...]],
                 device_side: bool = False) -> None:
        self._works = list(works)
        self._finish = finish
        self._result: tuple[Tensor, ...] | None = None
        self.device_side = device_side
        """True when ``wait`` does not block the host (it orders accelerator streams, as
        NCCL's does): the engine then never polls it."""
        self._total = len(self._works)
        self._done_at: list[float] = []
        for w in self._works:
            try:  # when each handle completed, for timelines (not every handle tells)
                w.get_future().add_done_callback(self._note)
            except (AttributeError, RuntimeError):
                self._total = -1

    def _note(self, _future: Any) -> None:
        self._done_at.append(time.perf_counter())

    @property
    def completed_at(self) -> float | None:
        """``time.perf_counter()`` when the work completed, where its handles report it
        (``None`` otherwise, or before it completed)."""
        if self._total > 0 and len(self._done_at) == self._total:
            return max(self._done_at)
        return None

    def ready(self) -> bool:
        """Whether waiting now would not block the host. Handles must report completion
        through ``is_completed()`` without a ``wait()`` (gloo's all-to-all, all-reduce and
        all-gather do; its reduce-scatter does not)."""
        return (self.device_side or self._result is not None
                or all(w.is_completed() for w in self._works))

    def wait(self) -> tuple[Tensor, ...]:
        """Block until done; the result tensors (the same tuple on every call)."""
        if self._result is None:
            for w in self._works:
                w.wait()
            self._works = []
            self._result = self._finish()
        return self._result


class AsyncComm(ABC):
    """Base of a communication part: an asynchronous operation and its backward.

    Subclasses implement :meth:`launch` and :meth:`launch_backward`; both must start
    their work and return at once. Each call gets its own ``ctx`` dict: the keyword
    arguments of the call (e.g. split sizes), plus whatever :meth:`launch` stores for
    :meth:`launch_backward`. Every rank of the group must make the same calls in the same
    order (as with any collective). Calling the operation, ``op(x, ...)``, makes a
    :class:`CommCall` to ``yield`` from a :class:`~dualpipe.overlap.PartedStage`.
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
