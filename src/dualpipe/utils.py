"""The original DualPipe's helpers for hand-written autograd code."""

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
