"""The step's micro-batch losses: how they combine into the gradient (``"sum"`` or
``"mean"``) and sharing them with every pipeline rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LOSS_REDUCTIONS", "reduced_criterion", "share_losses"]

LOSS_REDUCTIONS = ("sum", "mean")
"""``sum``: gradients of the sum of the micro-batch losses (the original DualPipe's);
``mean``: of their mean over all micro-batches of the step."""


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward; multiplies the gradient by ``scale`` in the backward."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def reduced_criterion(
    criterion: Callable[..., torch.Tensor], reduction: str, num_chunks: int
) -> Callable[..., torch.Tensor]:
    """``criterion`` whose losses keep their values but whose gradients are those of the
    ``reduction`` over ``num_chunks`` micro-batches (``"mean"``: each scaled by
    ``1 / num_chunks``, the gradient a one-process mean would give)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if reduction == "sum":
        return criterion
    scale = 1.0 / num_chunks

    def mean_criterion(*args: Any) -> torch.Tensor:
        loss = criterion(*args)
        if not isinstance(loss, torch.Tensor) or not torch.is_grad_enabled():
            return loss
        out: torch.Tensor = _ScaleGrad.apply(loss, scale)
        return out

    return mean_criterion


def share_losses(
    losses: torch.Tensor | None,
    stream: int | None,
    chunks_per_stream: int,
    num_streams: int,
    group: dist.ProcessGroup | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Collective over the pipeline group: every micro-batch's loss of the step (stream 0's
    first, as float32), on every rank; None on every rank if no rank computed losses.

    ``losses`` are this rank's per-micro-batch losses of ``stream`` (None where no stream
    ends or no criterion was given). Exact: each value is added to zeros only."""
    n = chunks_per_stream * num_streams
    buf = torch.zeros(n + 1, dtype=torch.float64, device=device)
    if losses is not None and stream is not None:
        buf[stream * chunks_per_stream : (stream + 1) * chunks_per_stream] = losses.detach().to(
            device, torch.float64
        )
        buf[n] = 1.0
    dist.all_reduce(buf, group=group)
    if buf[n].item() == 0.0:
        return None
    return buf[:n].to(torch.float32)
