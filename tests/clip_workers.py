"""Spawned-rank functions for the clipping tests (tests/test_clip.py): DTensor gradients of
FSDP2-sharded and tensor-parallel stages, and non-finite gradients, against
``torch.nn.utils.clip_grad_norm_`` on one process."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.runtime.pipeline import Pipeline

DIM, HIDDEN = 7, 13  # odd sizes: the shards of two ranks are uneven
STAGES = 4  # DualPipeV on 2 pipeline ranks


def _stage() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, DIM),
                         nn.LayerNorm(DIM))


def _reference() -> list[nn.Sequential]:
    torch.manual_seed(0)
    return [_stage() for _ in range(STAGES)]


def _fill(ref: list[nn.Sequential], seed: int) -> None:
    """Give every reference parameter a gradient (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    for stage in ref:
        for q in stage.parameters():
            q.grad = torch.randn(q.shape, generator=g)


def _copy_grads(mine: list[tuple[int, nn.Module]], ref: list[nn.Sequential]) -> None:
    """Each of this rank's parameters gets its reference gradient (or none), as a DTensor
    with the parameter's placements where the parameter is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k, stage in mine:
        for p, q in zip(stage.parameters(), ref[k].parameters(), strict=True):
            if q.grad is None:
                p.grad = None
            elif isinstance(p, DTensor):
                # a copy: a shard may be a view of the tensor it is cut from
                p.grad = distribute_tensor(q.grad.clone(), p.device_mesh, p.placements,
                                           src_data_rank=None)
            else:
                p.grad = q.grad.clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _worst(mine: list[tuple[int, nn.Module]], ref: list[nn.Sequential]) -> float:
    """The largest relative difference of this rank's (full) gradients from the reference
    (a parameter without reference gradient must have none)."""
    worst = 0.0
    for k, stage in mine:
        for p, q in zip(stage.parameters(), ref[k].parameters(), strict=True):
            if q.grad is None:
                assert p.grad is None
                continue
            assert p.grad is not None
            worst = max(worst, ((_full(p.grad) - q.grad).norm() / q.grad.norm()).item())
    return worst


def dtensor_stages(rank: int, world: int) -> dict[str, object]:
    """4 processes, a (pp=2, x=2) mesh, DualPipeV over pp: pipeline rank 0's stages (0 and
    3) are FSDP2-sharded over x, pipeline rank 1's (1 and 2) tensor-parallel over x
    (column-wise then row-wise Linear: Shard(0), Shard(1) and Replicate gradients, and
    once Partial ones; the LayerNorm stays a plain module). clip_grad_norm_ equals one
    process: 2-norm with and without ``data_group`` (DTensor gradients are counted by their
    placements either way), and the max-norm exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from dualpipe.clip import clip_grad_norm_, grad_norm

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "x"))
    pp_rank = mesh.get_local_rank("pp")
    ref = _reference()
    stages = _reference()
    ids = (pp_rank, STAGES - 1 - pp_rank)
    for k in ids:
        if pp_rank == 0:
            fully_shard(stages[k], mesh=mesh["x"])
        else:
            parallelize_module(stages[k], mesh["x"],
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
    pipe = Pipeline([stages[k] for k in ids], "dualpipev", process_group=mesh.get_group("pp"),
                    timeout=60)
    mine = [(k, stages[k]) for k in ids]
    out: dict[str, object] = {}

    _fill(ref, seed=1)
    _copy_grads(mine, ref)
    if pp_rank == 1:  # the row-wise biases' gradients as Partial sums over x (1/4 + 3/4)
        from torch.distributed.tensor import DTensor, Partial

        share = 0.25 if mesh.get_local_rank("x") == 0 else 0.75
        for k in ids:
            grad = ref[k][2].bias.grad
            assert grad is not None
            stages[k][2].bias.grad = DTensor.from_local(grad * share, mesh["x"], [Partial()],
                                                        run_check=False)
    norm = clip_grad_norm_(pipe, max_norm=0.5)
    expect = torch.nn.utils.clip_grad_norm_([q for s in ref for q in s.parameters()], 0.5)
    out["norm"] = (norm.item(), expect.item())
    out["clipped_worst"] = _worst(mine, ref)

    _fill(ref, seed=2)
    _copy_grads(mine, ref)
    inf = grad_norm(pipe, math.inf)
    expect_inf = torch.nn.utils.get_total_norm([q.grad for s in ref for q in s.parameters()],
                                               math.inf)
    out["inf_equal"] = bool(torch.equal(inf, expect_inf))

    # data_group= (here the x groups): DTensor gradients are counted by their placements,
    # not reduced again; without plain gradients the norm is unchanged
    _fill(ref, seed=3)
    for s in ref:
        s[3].weight.grad = s[3].bias.grad = None  # the plain LayerNorms: no gradient
    _copy_grads(mine, ref)
    with_group = clip_grad_norm_(pipe, max_norm=0.5, data_group=mesh.get_group("x"))
    expect = torch.nn.utils.clip_grad_norm_(
        [q for s in ref for q in s.parameters() if q.grad is not None], 0.5)
    out["data_group_norm"] = (with_group.item(), expect.item())
    out["data_group_worst"] = _worst(mine, ref)

    # a NaN in the shard of stage 0 held by x-rank 1 (the last row of a Shard(0) weight)
    _fill(ref, seed=4)
    grad = ref[0][0].weight.grad
    assert grad is not None
    grad[-1, 0] = math.nan
    _copy_grads(mine, ref)
    out["nan_shard_norm"] = grad_norm(pipe, math.inf).item()
    pipe.close()
    dist.barrier()
    return out



def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN."""
    return bool(torch.equal(torch.isnan(a), torch.isnan(b))
                and torch.equal(a.nan_to_num(), b.nan_to_num()))


def nonfinite(rank: int, world: int) -> dict[str, object]:
    """2 processes, DualPipeV over 4 plain stages: a NaN or inf gradient on either rank
    gives the norm torch gives on one process (NaN propagates through the max-norm too),
    on every rank; ``error_if_nonfinite=True`` raises on every rank and scales nothing;
    without it the gradients are scaled as torch scales them."""
    from dualpipe.clip import clip_grad_norm_, grad_norm

    ref = _reference()
    stages = _reference()
    ids = (rank, STAGES - 1 - rank)
    pipe = Pipeline([stages[k] for k in ids], "dualpipev", timeout=60)
    mine = [(k, stages[k]) for k in ids]
    out: dict[str, object] = {}
    # (name, norm type, stage whose first weight gets the bad value, the value)
    cases = [
        ("nan on rank 1, max-norm", math.inf, 1, math.nan),
        ("nan on rank 0, max-norm", math.inf, 0, math.nan),
        ("inf on rank 1, max-norm", math.inf, 2, math.inf),
        ("nan on rank 1, 2-norm", 2.0, 2, math.nan),
        ("inf on rank 1, 2-norm", 2.0, 1, math.inf),
    ]
    for seed, (name, norm_type, stage, value) in enumerate(cases, start=10):
        _fill(ref, seed)
        grad = ref[stage][0].weight.grad
        assert grad is not None
        grad[1, 2] = value
        expect = torch.nn.utils.get_total_norm(
            [q.grad for s in ref for q in s.parameters()], norm_type)
        _copy_grads(mine, ref)
        got = grad_norm(pipe, norm_type)
        raised = ""
        before = [p.grad.clone() for _, s in mine for p in s.parameters() if p.grad is not None]
        try:
            clip_grad_norm_(pipe, 0.5, norm_type, error_if_nonfinite=True)
        except RuntimeError as exc:
            raised = str(exc)
        after = [p.grad for _, s in mine for p in s.parameters() if p.grad is not None]
        untouched = all(_same(a, b) for a, b in zip(before, after, strict=True))
        clipped = clip_grad_norm_(pipe, 0.5, norm_type)
        torch.nn.utils.clip_grad_norm_([q for s in ref for q in s.parameters()], 0.5,
                                       norm_type)
        scaled_as_torch = all(
            _same(p.grad, q.grad)
            for k, s in mine for p, q in zip(s.parameters(), ref[k].parameters(), strict=True)
            if p.grad is not None and q.grad is not None
        )
        out[name] = {
            "norm": got.item(), "expect": expect.item(), "same": _same(got, expect),
            "clipped_same": _same(clipped, expect), "raised": raised,
            "untouched": untouched, "scaled_as_torch": scaled_as_torch,
        }
    pipe.close()
    return out
