"""The original DualPipe's helpers for hand-written autograd code: :class:`WeightGradStore`
(defer a custom Function's weight-gradient work to the ``W`` actions) and :func:`run_backward`.

Example, a linear layer that defers its weight gradient like the original's examples::

    class LinearFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return x @ weight.T

        @staticmethod
        def backward(ctx, grad_out):
            x, weight = ctx.saved_tensors

            def grad_weight() -> None:
                g = grad_out.flatten(0, -2).T @ x.flatten(0, -2)
                weight.grad = g if weight.grad is None else weight.grad + g

            if WeightGradStore.enabled:
                WeightGradStore.put(grad_weight)  # runs later, in the matching W action
            else:
                grad_weight()
            return grad_out @ weight, None

Stages made of ordinary autograd operations need none of this: the runtime splits their
backward automatically (see :mod:`dualpipe.runtime.split_backward`).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch

__all__ = ["WeightGradStore", "run_backward"]

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


def run_backward(
    tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor | None]
) -> None:
    """Backward from ``tensors`` with gradients ``grad_tensors``, accumulating into the
    ``.grad`` of every leaf reached and freeing the graph (the original's helper, for
    ``overlapped_forward_backward``).

    Pairs whose tensor needs no gradient, or whose gradient is ``None``, are skipped
    (a one-element tensor with ``None`` gets an implicit gradient of one)."""
    if len(tensors) != len(grad_tensors):
        raise ValueError(
            f"run_backward: {len(tensors)} tensors but {len(grad_tensors)} gradients"
        )
    roots: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []
    for t, g in zip(tensors, grad_tensors, strict=True):
        if not t.requires_grad:
            continue
        if g is None:
            if t.numel() != 1:
                continue
            g = torch.ones_like(t)
        roots.append(t)
        grads.append(g)
    if roots:
        torch.autograd.backward(roots, grads)
