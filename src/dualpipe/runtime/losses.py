"""The step's micro-batch losses: how they combine into the gradient (``"sum"`` or
``"mean"``) and sharing them with every pipeline rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..transport.base import BaseTransport
from ..transport.guarded import all_reduce

__all__ = ["LOSS_REDUCTIONS", "reduced_criterion", "share_losses", "count_labels"]


def count_labels(labels: list[tuple[torch.Tensor | None, ...]] | None,
                 ignore_index: int) -> int:
    """The valid labels of this rank's micro-batches: the first label tensor's elements
    other than ``ignore_index``."""
    if not labels:
        return 0
    total = 0
    for per_chunk in labels:
        first = per_chunk[0] if per_chunk else None
        if first is None:
            raise ValueError("loss_reduction='token_mean' counts the first label tensor's "
                             "valid entries: pass the labels")
        total += int((first != ignore_index).sum().item())
    return total

LOSS_REDUCTIONS = ("sum", "mean", "token_mean")
"""``sum``: gradients of the sum of the micro-batch losses (the original DualPipe's);
``mean``: of their mean over all micro-batches of the step; ``token_mean``: the criterion
returns each micro-batch's *sum* of token losses and the gradients are those of the sum
over the step divided by the step's count of valid labels (every micro-batch, every
direction, and the data-parallel replicas when a ``data_group`` is given)."""


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
    criterion: Callable[..., torch.Tensor], reduction: str, num_chunks: int,
    tokens: float = 0.0,
) -> Callable[..., torch.Tensor]:
    """``criterion`` whose losses keep their values but whose gradients are those of the
    ``reduction`` over ``num_chunks`` micro-batches (``"mean"``: each scaled by
    ``1 / num_chunks``, the gradient a one-process mean would give; ``"token_mean"``: by
    ``1 / tokens``, the step's count of valid labels)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
    if reduction == "sum":
        return criterion
    if reduction == "token_mean":
        # a step without a valid label has no gradient: its loss sums are zeros
        scale = 1.0 / tokens if tokens > 0 else 0.0
    else:
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
    transport: BaseTransport | None = None,
) -> torch.Tensor | None:
    """Collective over the pipeline group: every micro-batch's loss of the step (stream 0's
    first, as float32), on every rank; None on every rank if no rank computed losses.

    ``losses`` are this rank's per-micro-batch losses of ``stream`` (None where no stream
    ends or no criterion was given). Exact: each value is added to zeros only. With the
    pipeline's ``transport``, the all-reduce is waited for with its failure check (a rank
    that failed after its step never joins it)."""
    n = chunks_per_stream * num_streams
    buf = torch.zeros(n + 1, dtype=torch.float64, device=device)
    if losses is not None and stream is not None:
        buf[stream * chunks_per_stream : (stream + 1) * chunks_per_stream] = losses.detach().to(
            device, torch.float64
        )
        buf[n] = 1.0
    if transport is None:
        dist.all_reduce(buf, group=group)
    else:
        all_reduce(buf, group, transport, "the all-reduce of the step's losses "
                   "(broadcast_loss)", post=True)
    if buf[n].item() == 0.0:
        return None
    return buf[:n].to(torch.float32)
