"""Spawned-rank functions: every collective's forward and backward, part by part and as
an ordinary autograd operation, against the same sums computed from every rank's data."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dualpipe.overlap import AllGather, AllReduce, AsyncComm, PartedStage, run_backward, run_forward


class OneComm(PartedStage):
    def __init__(self, op: AsyncComm) -> None:
        super().__init__()
        self.op = op

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        y = yield self.op(x * 2.0)
        return y * 3.0


def _data(rank: int, seed: int, rows: int = 4) -> Tensor:
    return torch.randn(rows, 3, generator=torch.Generator().manual_seed(10 * seed + rank))


def _expect(name: str, n: int, rank: int) -> tuple[Tensor, Tensor]:
    """(output, input gradient) of ``OneComm(op)`` on rank ``rank``, from all ranks' data."""
    xs = [_data(r, 0) * 2.0 for r in range(n)]
    gs = [_data(r, 1, rows=4 * n if name.startswith("gather") else
                (4 // n if name == "scatter" else 4)) * 3.0 for r in range(n)]
    blk = 4 // n
    if name.startswith("gather"):
        out = torch.cat(xs)
        gx = (sum(g[rank * 4:(rank + 1) * 4] for g in gs) if name == "gather"
              else gs[rank][rank * 4:(rank + 1) * 4])
    elif name == "scatter":
        out = sum(x[rank * blk:(rank + 1) * blk] for x in xs)
        gx = torch.cat(gs)
    else:
        out = sum(xs)
        gx = gs[rank] if name == "reduce" else sum(gs)
    return out * 3.0, gx * 2.0


def collectives(rank: int, world: int) -> list[str]:
    from dualpipe.overlap import ReduceScatter

    ops: dict[str, AsyncComm] = {
        "gather": AllGather(),
        "gather_slice": AllGather(backward="slice"),
        "scatter": ReduceScatter(),
        "reduce": AllReduce(),
        "reduce_all": AllReduce(backward="all_reduce"),
    }
    checked = []
    for name, op in ops.items():
        stage = OneComm(op)
        want_out, want_grad = _expect(name, world, rank)
        rows = want_out.shape[0]
        g = _data(rank, 1, rows=rows)
        # part by part
        x = _data(rank, 0).requires_grad_(True)
        rec = run_forward(stage, (x,))
        (gx,) = run_backward(rec, [rec.outputs], [g]).input_grads
        torch.testing.assert_close(rec.outputs, want_out, msg=name)
        torch.testing.assert_close(gx, want_grad, msg=name)
        # as an ordinary module
        x2 = _data(rank, 0).requires_grad_(True)
        out = stage(x2)
        out.backward(g)
        assert torch.equal(out, rec.outputs) and torch.equal(x2.grad, gx), name
        checked.append(name)
    dist.barrier()
    return checked
