"""Collectives over other process groups as communication parts, each with its backward:
expert-parallel all-to-all, tensor-parallel all-reduce / all-gather / reduce-scatter."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .asynccomm import AsyncComm, InFlight

__all__ = ["AllToAll", "AllReduce", "AllGather", "ReduceScatter", "exchange_counts"]

# the newer names (torch >= 2.10) of the single-tensor collectives, else the older ones
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _splits(value: Any, name: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        value = value.tolist()
    out = [int(v) for v in value]
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be non-negative, got {out}")
    return out


def exchange_counts(counts: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """What every rank of ``group`` sends this rank, given what this rank sends each of
    them (``counts[r]`` rows to rank ``r``): the ``out_splits`` of a variable
    :class:`AllToAll`. Blocking (a few bytes)."""
    send = counts.detach().to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


class AllToAll(AsyncComm):
    """All-to-all along dimension 0 over ``group`` (expert-parallel dispatch and combine).

    ``op(x)`` splits ``x`` into equal row blocks, one per rank;
    ``op(x, in_splits=..., out_splits=...)`` sends ``in_splits[r]`` rows to rank ``r`` and
    receives ``out_splits[r]`` rows from it (see :func:`exchange_counts`). The backward
    is the all-to-all of the gradients with the splits swapped.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def _run(self, x: Tensor, in_splits: list[int] | None,
             out_splits: list[int] | None) -> InFlight:
        x = x.contiguous()
        if (in_splits is None) != (out_splits is None):
            raise ValueError("AllToAll: give both in_splits and out_splits, or neither")
        if in_splits is not None and sum(in_splits) != x.shape[0]:
            raise ValueError(
                f"AllToAll: in_splits {in_splits} do not add up to the {x.shape[0]} rows sent"
            )
        rows = x.shape[0] if out_splits is None else sum(out_splits)
        out = x.new_empty((rows, *x.shape[1:]))
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=self.group,
                                      async_op=True)
        return _on_device(InFlight([work], lambda: (out,)), x)

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (x,) = inputs
        ins = _splits(ctx.get("in_splits"), "in_splits")
        outs = _splits(ctx.get("out_splits"), "out_splits")
        ctx["in_splits"], ctx["out_splits"] = ins, outs
        return self._run(x, ins, outs)

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (g,) = grads
        return self._run(g, ctx["out_splits"], ctx["in_splits"])


class AllReduce(AsyncComm):
    """Sum over ``group`` (tensor-parallel row-parallel output).

    Backward: ``"identity"`` (the default: what follows runs replicated on every rank,
    Megatron's convention) or ``"all_reduce"`` (what follows differs per rank).
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 backward: str = "identity") -> None:
        if backward not in ("identity", "all_reduce"):
            raise ValueError(f"AllReduce backward must be 'identity' or 'all_reduce', "
                             f"got {backward!r}")
        self.group = group
        self.backward = backward

    def _sum(self, x: Tensor) -> InFlight:
        out = x.clone(memory_format=torch.contiguous_format)
        work = dist.all_reduce(out, group=self.group, async_op=True)
        return _on_device(InFlight([work], lambda: (out,)), x)

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (x,) = inputs
        return self._sum(x)

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (g,) = grads
        if self.backward == "identity":
            return InFlight([], lambda: (g,))
        return self._sum(g)


class AllGather(AsyncComm):
    """Concatenate every rank's tensor along dimension 0 (in rank order) over ``group``.

    Backward: ``"reduce_scatter"`` (the default: what follows differs per rank, as in
    sequence parallelism) or ``"slice"`` (what follows runs replicated: keep this rank's
    rows of the gradient).
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 backward: str = "reduce_scatter") -> None:
        if backward not in ("reduce_scatter", "slice"):
            raise ValueError(f"AllGather backward must be 'reduce_scatter' or 'slice', "
                             f"got {backward!r}")
        self.group = group
        self.backward = backward

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (x,) = inputs
        return _gather(x.contiguous(), self.group)

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (g,) = grads
        if self.backward == "reduce_scatter":
            return _scatter_sum(g.contiguous(), self.group)
        size = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        rows = g.shape[0] // size
        return InFlight([], lambda: (g[rank * rows:(rank + 1) * rows],))


class ReduceScatter(AsyncComm):
    """Sum over ``group``, each rank keeping its block of rows (dimension 0, rank order;
    on gloo an all-to-all of the blocks summed in rank order).

    Backward: all-gather of the gradients.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (x,) = inputs
        return _scatter_sum(x.contiguous(), self.group)

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        (g,) = grads
        return _gather(g.contiguous(), self.group)


def _gather(x: Tensor, group: dist.ProcessGroup | None) -> InFlight:
    size = dist.get_world_size(group)
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    work = _ALL_GATHER(out, x, group=group, async_op=True)
    return _on_device(InFlight([work], lambda: (out,)), x)


def _scatter_sum(x: Tensor, group: dist.ProcessGroup | None) -> InFlight:
    size = dist.get_world_size(group)
    if x.shape[0] % size:
        raise ValueError(f"reduce-scatter: {x.shape[0]} rows do not split over {size} ranks")
    rows = x.shape[0] // size
    if dist.get_backend(group) != "gloo":
        out = x.new_empty((rows, *x.shape[1:]))
        work = _REDUCE_SCATTER(out, x, group=group, async_op=True)
        return _on_device(InFlight([work], lambda: (out,)), x)
    # gloo's reduce-scatter never reports completion before wait(): an all-to-all of the
    # blocks, summed in rank order on arrival, instead
    blocks = x.new_empty((size, rows, *x.shape[1:]))
    work = dist.all_to_all_single(blocks, x, group=group, async_op=True)
    return InFlight([work], lambda: (blocks.sum(0),))


def _on_device(pending: InFlight, x: Tensor) -> InFlight:
    """On an accelerator, waiting only orders the streams: never worth polling."""
    if x.device.type != "cpu":
        pending.device_side = True
    return pending


