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
backward automatically (see :mod:`dualpipe.autograd`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .autograd.deferral import WeightGradStore

__all__ = ["WeightGradStore", "run_backward"]

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
