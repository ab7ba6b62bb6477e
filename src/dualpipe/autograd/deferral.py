"""Deferred weight-gradient work: the handle a split backward returns; explicit deferral."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .engine import accumulate

__all__ = [
    "WeightGradWork", "WeightGradStore", "defer_weight_grad", "run_weight_grad_fns", "Sink",
    "EngineCall",
]

WeightGradFn = Callable[[], None]


class WeightGradStore:
    """Process-wide store of deferred weight-gradient functions, as in the original.

    While the runtime runs an input-only backward (an ``I`` action), ``enabled`` is True:
    a custom Function's ``backward`` then calls :meth:`put` instead of computing its
    weight gradient, and the runtime runs what was put, under ``torch.no_grad()``, in
    the matching ``W`` action. Everywhere else (full backwards, overlapped F&B pairs,
    the ``W`` actions themselves, plain ``loss.backward()``) ``enabled`` is False and the
    function should run at once.

    :meth:`flush`, :meth:`pop` and :meth:`clear` keep the original's semantics for code
    that drives the store itself: ``flush`` closes the current group of put functions,
    ``pop`` runs the oldest closed group (FIFO, under ``torch.no_grad()``), ``clear``
    forgets everything. The pipelines here do not use the queue: each ``I`` action's
    functions travel with that micro-batch's deferred work.
    """

    enabled: ClassVar[bool] = False
    cache: ClassVar[list[WeightGradFn]] = []
    funcs_queue: ClassVar[queue.Queue[list[WeightGradFn]]] = queue.Queue()

    @classmethod
    def put(cls, func: WeightGradFn) -> None:
        """Add ``func`` to the current group."""
        if not callable(func):
            raise TypeError(f"WeightGradStore.put expects a callable, got {type(func).__name__}")
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current group: queue it for :meth:`pop`."""
        cls.funcs_queue.put(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest flushed group, under ``torch.no_grad()``."""
        if cls.funcs_queue.empty():
            raise RuntimeError("WeightGradStore.pop: no flushed group to run")
        funcs = cls.funcs_queue.get()
        run_weight_grad_fns(funcs)

    @classmethod
    def clear(cls) -> None:
        """Forget every stored function."""
        cls.cache = []
        cls.funcs_queue = queue.Queue()

    @classmethod
    @contextmanager
    def collect(cls, into: list[WeightGradFn]) -> Iterator[None]:
        """Used by the runtime around an input-only backward: enable the store and move
        the functions put meanwhile into ``into`` (what was stored before is kept)."""
        was_enabled, outer = cls.enabled, cls.cache
        cls.enabled, cls.cache = True, []
        try:
            yield
        finally:
            into.extend(cls.cache)
            cls.enabled, cls.cache = was_enabled, outer


def run_weight_grad_fns(funcs: Sequence[WeightGradFn]) -> None:
    """Run deferred weight-gradient functions with autograd off, so ``.grad`` never gets
    a ``grad_fn`` and no activation is kept alive by it."""
    with torch.no_grad():
        for func in funcs:
            func()


# --------------------------------------------------------------------------------------
# Explicit deferral (defer_weight_grad)
# --------------------------------------------------------------------------------------


class Sink:
    """Where ``defer_weight_grad`` sends work while a backward of this module runs."""

    __slots__ = ("queue",)

    def __init__(self, queue: list[Callable[[], None]] | None) -> None:
        # None: run the work immediately (backward_full, weight pass).
        self.queue = queue

    def __enter__(self) -> Sink:
        with _SINK_LOCK:
            _SINKS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _SINK_LOCK:
            for i in range(len(_SINKS) - 1, -1, -1):
                if _SINKS[i] is self:
                    del _SINKS[i]
                    break


# A process-wide stack rather than a thread-local: on CUDA the autograd engine runs
# backward functions on its device threads, not on the thread that called backward.
_SINK_LOCK = threading.Lock()
_SINKS: list[Sink] = []


def defer_weight_grad(fn: Callable[[], None]) -> None:
    """Defer weight-gradient work from inside a custom autograd Function's ``backward``.

    While :func:`backward_input` runs, ``fn`` is queued on the :class:`WeightGradWork` it
    returns and is called, once, by :meth:`WeightGradWork.run`. Anywhere else (inside
    :func:`backward_full`, during :meth:`WeightGradWork.run`, in a plain ``loss.backward()``)
    ``fn`` is called immediately. ``fn`` must do the accumulation itself, e.g.
    ``weight.grad = g if weight.grad is None else weight.grad + g``.

    The active split backward is tracked per process, not per thread (the autograd engine
    runs CUDA backward functions on its own threads), so run at most one
    :func:`backward_input` / :func:`backward_full` at a time per process.
    """
    if not callable(fn):
        raise TypeError(f"defer_weight_grad expects a callable, got {type(fn).__name__}")
    with _SINK_LOCK:
        sink = _SINKS[-1] if _SINKS else None
        if sink is not None and sink.queue is not None:
            sink.queue.append(fn)
            return
    fn()


# --------------------------------------------------------------------------------------
# Deferred work
# --------------------------------------------------------------------------------------

# One deferred engine call: root edges, their gradients, and the leaves to accumulate into
# (None: every leaf reached, used when the roots only reach parameters).
EngineCall = tuple[list[GradientEdge], list[Tensor], "list[Tensor] | None"]


class WeightGradWork:
    """The deferred part of a :func:`backward_input`: the weight-gradient work.

    :meth:`run` performs it exactly once, accumulating into the parameters' ``.grad``
    (through autograd's ``AccumulateGrad`` nodes, as ``loss.backward()`` would), then runs
    the functions queued with :func:`defer_weight_grad` or put in the
    :class:`WeightGradStore`, all under ``torch.no_grad()``, then drops every
    reference (autograd nodes, captured gradients), so the stage's remaining saved
    activations can be freed.
    Calling :meth:`run` a second time raises ``RuntimeError``.
    """

    __slots__ = ("_calls", "_fns", "_keepalive", "_done", "_unread")

    def __init__(
        self,
        calls: list[EngineCall] | None = None,
        fns: list[Callable[[], None]] | None = None,
        keepalive: list[Any] | None = None,
    ) -> None:
        self._calls: list[EngineCall] = calls if calls is not None else []
        self._fns: list[Callable[[], None]] = fns if fns is not None else []
        self._keepalive: list[Any] = keepalive if keepalive is not None else []
        self._done = False
        # stage inputs no weight-side node reads directly (see release_unread_inputs)
        self._unread: list[Tensor] = []

    def release_unread_inputs(self) -> int:
        """Empty the stage inputs that only the input side read (their gradient is
        computed; no node of the deferred work saved them as they are), so their memory
        goes now instead of at ``run``: autograd's leaf node of an input keeps the
        tensor for as long as the graph the work references lives. Views of an input
        that weight-side nodes saved keep their own hold on its storage and stay valid.
        For callers that own the inputs (the runtime's received activations): the
        tensors become empty. Returns how many were emptied."""
        unread, self._unread = self._unread, []
        for t in unread:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return len(unread)

    @property
    def done(self) -> bool:
        """Whether :meth:`run` has been called."""
        return self._done

    @property
    def num_engine_calls(self) -> int:
        """How many autograd engine calls :meth:`run` will make (diagnostics)."""
        return len(self._calls)

    def run(self) -> None:
        """Perform the deferred weight-gradient work (once) and free its references."""
        if self._done:
            raise RuntimeError("WeightGradWork.run() was already called")
        self._done = True
        calls, fns = self._calls, self._fns
        self._calls, self._fns, self._keepalive = [], [], []
        # autograd off: hand-written accumulations (``w.grad += g.T @ x``) must not give
        # ``.grad`` a grad_fn (nor keep activations alive through one)
        with Sink(None), torch.no_grad():
            for roots, grads, params in calls:
                accumulate(roots, grads, params)
            calls.clear()
            run_weight_grad_fns(fns)
            fns.clear()

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return (
            f"WeightGradWork({state}, engine_calls={len(self._calls)}, "
            f"deferred_fns={len(self._fns)})"
        )


