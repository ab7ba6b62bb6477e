"""Gradient clipping across a pipeline: the global gradient norm over every stage (each
stage counted once, DualPipe's mirrored copies included), then the same scaling everywhere."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .runtime.pipeline import Pipeline
from .stages import local_stages, owned_parameters, unique_parameters

__all__ = ["grad_norm", "clip_grad_norm_"]


def grad_norm(
    pipe: Pipeline,
    norm_type: float = 2.0,
    *,
    data_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Collective over the pipeline's ranks: the ``norm_type``-norm of all gradients of the
    model, the same value (a float32 tensor on the pipeline's device) on every rank.

    Every stage counts once, however many ranks hold it. ``data_group``: pass it only if
    each rank of that group holds a *different* part of the gradients (sharded data
    parallelism); replicated data-parallel gradients (after
    :class:`~dualpipe.data_parallel.GradientSync`) are equal on every replica and need no
    extra reduction.
    """
    p = float(norm_type)
    grads = [q.grad for q in owned_parameters(pipe) if q.grad is not None]
    device = pipe.device
    if math.isinf(p):
        local = max((g.detach().abs().max().double() for g in grads), default=None)
        total = torch.zeros((), dtype=torch.float64, device=device) if local is None else local
        op = dist.ReduceOp.MAX
    else:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for g in grads:
            total += torch.linalg.vector_norm(g.detach(), p).double() ** p
        op = dist.ReduceOp.SUM
    total = total.to(device)
    dist.all_reduce(total, op=op, group=pipe.group)
    if data_group is not None:
        dist.all_reduce(total, op=op, group=data_group)
    if not math.isinf(p):
        total = total ** (1.0 / p)
    return total.float()


def clip_grad_norm_(
    pipe: Pipeline,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    data_group: dist.ProcessGroup | None = None,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Collective over the pipeline's ranks: scale every gradient of ``pipe``'s modules so
    that the model's global gradient norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_`` does on one process), and return that norm before
    clipping (the same value on every rank). See :func:`grad_norm` for ``data_group``.

    Call it after the step (DualPipe: after the mirrored gradients were summed, which
    ``step`` does by default) and before ``optimizer.step()``.
    """
    total = grad_norm(pipe, norm_type, data_group=data_group)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the pipeline's gradients is non-finite "
            f"({total.item()}); set error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for q in unique_parameters(m for _, m in local_stages(pipe)):
        if q.grad is not None:
            q.grad.detach().mul_(coef.to(q.grad.device, q.grad.dtype))
    return total
