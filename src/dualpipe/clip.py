"""Gradient clipping across a pipeline: the global gradient norm over every stage (each
parameter counted once: DualPipe's mirrored copies, tied weights, DTensor shards and
replicas), then the same scaling everywhere."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.distributed as dist

from .runtime.pipeline import Pipeline
from .stages import local_stages, owned_parameters, unique_parameters
from .transport.base import BaseTransport
from .transport.guarded import all_reduce

__all__ = ["grad_norm", "clip_grad_norm_"]


def _dtensor_api() -> tuple[type, type] | None:
    """``(DTensor, Replicate)`` from ``torch.distributed.tensor`` (``_tensor`` before torch
    2.5), or None where DTensor does not exist."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.distributed._tensor import DTensor, Replicate
        except ImportError:
            return None
    return DTensor, Replicate


def _is_dtensor(g: torch.Tensor) -> bool:
    api = _dtensor_api()
    return api is not None and isinstance(g, api[0])


_WHAT = "the all-reduce of the gradient norm (clip_grad_norm_/grad_norm)"


def _reduce(value: torch.Tensor, infinite: bool, group: dist.ProcessGroup | None,
            transport: BaseTransport) -> torch.Tensor:
    """All-reduce a float64 scalar over ``group``: the sum, or (``infinite``) the maximum
    with NaN kept — gloo's MAX, like Python's ``max``, drops a NaN; torch's norm
    propagates it, and so does this. Waited for with the pipeline's failure check (a
    failure anywhere in the job ends the wait at once, naming the failed rank)."""
    if not infinite:
        all_reduce(value, group, transport, _WHAT, op=dist.ReduceOp.SUM, host=False,
                   post=True)
        return value
    nan = torch.isnan(value)
    both = torch.stack([torch.where(nan, torch.zeros_like(value), value), nan.to(value.dtype)])
    all_reduce(both, group, transport, _WHAT, op=dist.ReduceOp.MAX, host=False, post=True)
    return torch.where(both[1] > 0, torch.full_like(value, math.nan), both[0])


def _part(g: torch.Tensor, p: float, acc: torch.Tensor) -> torch.Tensor:
    """``acc`` combined with ``g``'s share: ``+ |g|_p ** p``, or (``p = inf``) the max of
    ``|g|`` (NaN propagates, as in torch)."""
    g = g.detach()
    if g.numel() == 0:  # an empty shard
        return acc
    if math.isinf(p):
        return torch.maximum(acc, g.abs().max().to(acc.device, torch.float64))
    return acc + torch.linalg.vector_norm(g, p).to(acc.device, torch.float64) ** p


def _dtensor_parts(grads: list[Any], p: float, device: torch.device,
                   transport: BaseTransport) -> torch.Tensor:
    """The ``p``-norm share (sum of powers, or max) of DTensor gradients, complete: each
    gradient's local shards are combined over the mesh dimensions it is sharded along
    (one collective per distinct set of such dimensions); replicated dimensions hold the
    same value and are not reduced. ``Partial`` gradients are first reduced to replicas."""
    api = _dtensor_api()
    assert api is not None
    replicate = api[1]
    infinite = math.isinf(p)
    by_groups: dict[tuple[str, ...], tuple[list[dist.ProcessGroup], torch.Tensor]] = {}
    for g in grads:
        mesh, placements = g.device_mesh, tuple(g.placements)
        if any(pl.is_partial() for pl in placements):
            placements = tuple(replicate() if pl.is_partial() else pl for pl in placements)
            g = g.redistribute(mesh, placements)
        groups = [mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard()]
        key = tuple(group.group_name for group in groups)
        local = g.to_local()
        empty = torch.zeros((), dtype=torch.float64, device=local.device)
        _, acc = by_groups.get(key, (groups, empty))
        by_groups[key] = (groups, _part(local, p, acc))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for groups, acc in by_groups.values():
        for group in groups:
            acc = _reduce(acc, infinite, group, transport)
        acc = acc.to(device)
        total = torch.maximum(total, acc) if infinite else total + acc
    return total


def grad_norm(
    pipe: Pipeline,
    norm_type: float = 2.0,
    *,
    data_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Collective over the pipeline's ranks: the ``norm_type``-norm of all gradients of the
    model, the same value (a float32 tensor on the pipeline's device) on every rank.

    Every parameter counts once, however many ranks hold it: a stage held by two ranks
    (DualPipe) once, a tied weight once, and a DTensor gradient (FSDP2 ``fully_shard``,
    tensor parallelism, or both) by its placements — its shards summed over the mesh
    dimensions it is sharded along (a collective over those), its replicas once. Every
    rank of a DTensor's mesh must hold a gradient for it, or none (as FSDP2 and tensor
    parallelism leave them). NaN and inf propagate as in ``torch.nn.utils.clip_grad_norm_``.

    ``data_group`` concerns plain (non-DTensor) gradients only: pass it if each rank of
    that group holds a *different* part of them (sharded data parallelism by hand);
    replicated data-parallel gradients (after :class:`~dualpipe.data_parallel.GradientSync`)
    are equal on every replica and need no extra reduction. DTensor gradients are never
    reduced over ``data_group``: their placements already say how they are spread.
    """
    p = float(norm_type)
    infinite = math.isinf(p)
    grads = [q.grad for q in owned_parameters(pipe) if q.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    device = pipe.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in plain:
        total = _part(g, p, total)
    if data_group is not None:
        total = _reduce(total, infinite, data_group, pipe.transport)
    if sharded:
        complete = _dtensor_parts(sharded, p, device, pipe.transport)
        total = torch.maximum(total, complete) if infinite else total + complete
    total = _reduce(total, infinite, pipe.group, pipe.transport)
    if not infinite:
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
    clipping (the same value on every rank). Plain and DTensor gradients alike; see
    :func:`grad_norm` for how each is counted and for ``data_group``. With
    ``error_if_nonfinite``, a NaN or infinite norm raises ``RuntimeError`` on every rank
    (the norm is the same everywhere) and nothing is scaled.

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
    with torch.no_grad():
        for q in unique_parameters(m for _, m in local_stages(pipe)):
            g = q.grad
            if g is None:
                continue
            # a DTensor: scale its shard in place (also right for Partial gradients)
            local: torch.Tensor = cast(Any, g).to_local() if _is_dtensor(g) else g
            local.mul_(coef.to(local.device, local.dtype))
    return total
