"""Functions run on spawned ranks by tests/test_failure_domain.py: 2 data-parallel x 2
pipeline ranks where one rank of replica 0 fails while replica 1 waits inside a
data-parallel collective (GradientSync's all-reduce, FSDP2's reduce-scatter or all-gather,
the token_mean count all-reduce); every rank reports its error and when it came."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualpipe.errors import PipelineError
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.split import split_model
from dualpipe.transport.guarded import check_group

from .runtime.models import criterion, make_batch
from .training_workers import build_layers, my_share

DELAY = 1.0
"""Seconds the failing rank waits before it raises: the other replica is by then blocked
inside the data-parallel collective."""

FAILING = 1
"""The failing process: replica 0, pipeline rank 1."""


def _mesh(world: int) -> tuple[Any, dist.ProcessGroup, int]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    return mesh, mesh.get_group("pp"), mesh.get_local_rank("dp")


def _bomb(stage: nn.Module, at_call: int, report: dict[str, Any]) -> None:
    """Make ``stage``'s forward number ``at_call`` wait :data:`DELAY` s, then raise."""
    calls = [0]

    def boom(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        if calls[0] == at_call:
            time.sleep(DELAY)
            report["failed_at"] = time.time()
            raise RuntimeError("boom")

    stage.register_forward_pre_hook(boom)


def _outcome(report: dict[str, Any], where: str, exc: BaseException) -> None:
    report.update(where=where, error=type(exc).__name__, message=str(exc), at=time.time())


def _refused(group: dist.ProcessGroup, pipe: Pipeline) -> str:
    """The error the library gives for ``group`` now (via the store on every rank)."""
    try:
        check_group(group, pipe.transport)
    except PipelineError as exc:
        return str(exc)
    return ""


def gradient_sync(rank: int, world: int) -> dict[str, Any]:
    """1F1B, plain stages, ``GradientSync``: process 1 fails in its second forward; replica
    1 finished its step and waits in ``sync()`` for replica 0, which never comes."""
    from dualpipe.data_parallel import GradientSync

    _, pp_group, replica = _mesh(world)
    report: dict[str, Any] = {"rank": rank}
    mine = split_model(build_layers(seed=3), "1f1b", group=pp_group)
    if rank == FAILING:
        _bomb(mine[0], 2, report)
    pipe = Pipeline(mine, "1f1b", process_group=pp_group, timeout=60)
    sync = GradientSync(pipe)
    chunks = 4
    (x,), y = make_batch("mlp", 2 * chunks, seed=4 + replica)
    inputs, labels = my_share(pipe, x, y)
    try:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
    except PipelineError as exc:
        _outcome(report, "step", exc)
    else:
        report["entered"] = time.time()
        try:
            sync()
            report["where"] = "nowhere: sync completed"
        except PipelineError as exc:
            _outcome(report, "sync", exc)
    dist.barrier()  # the default group: untouched
    report["refused"] = _refused(sync.group, pipe)
    pipe.close()
    return report


def fsdp(rank: int, world: int, at_call: int) -> dict[str, Any]:
    """DualPipeV, stages in ``fully_shard`` over the data-parallel mesh dimension: process 1
    fails in forward number ``at_call`` of its first stage (1: replica 1 then waits in an
    all-gather of a stage's first forward; 4, the step's last: in a stage's
    reduce-scatter after its last backward)."""
    from torch.distributed.fsdp import fully_shard

    mesh, pp_group, replica = _mesh(world)
    report: dict[str, Any] = {"rank": rank}
    mine = split_model(build_layers(seed=5), "dualpipev", group=pp_group)
    for stage in mine:
        fully_shard(stage, mesh=mesh["dp"])
    if rank == FAILING:
        _bomb(mine[0], at_call, report)
    pipe = Pipeline(mine, "dualpipev", process_group=pp_group, timeout=60,
                    loss_reduction="mean")
    chunks = 2 * pipe.num_ranks
    (x,), y = make_batch("mlp", 2 * chunks, seed=10 + replica)
    inputs, labels = my_share(pipe, x, y)
    try:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        report["where"] = "nowhere: the step completed"
    except PipelineError as exc:
        _outcome(report, "step", exc)
    dist.barrier()
    report["refused"] = _refused(mesh.get_group("dp"), pipe)
    pipe.close()
    return report


def _sum_mse(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, label, reduction="sum")


def token_mean(rank: int, world: int) -> dict[str, Any]:
    """1F1B with ``loss_reduction="token_mean"`` over ``data_group``: replica 1's last
    rank waits in the all-reduce of the step's label count; replica 0's last rank is
    late, and then refuses the step (no criterion)."""
    mesh, pp_group, replica = _mesh(world)
    report: dict[str, Any] = {"rank": rank}
    mine = split_model(build_layers(seed=6), "1f1b", group=pp_group)
    data_group = mesh.get_group("dp")
    pipe = Pipeline(mine, "1f1b", process_group=pp_group, timeout=60,
                    loss_reduction="token_mean", data_group=data_group)
    chunks = 4
    (x,), y = make_batch("mlp", 2 * chunks, seed=20 + replica)
    inputs, labels = my_share(pipe, x, y)
    criterion_for: Any = _sum_mse
    if rank == FAILING:
        time.sleep(DELAY)
        report["failed_at"] = time.time()
        criterion_for = None  # refused: training needs a criterion where the loss is
    elif labels:
        report["entered"] = time.time()
    try:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion_for, labels=labels)
        report["where"] = "nowhere: the step completed"
    except (PipelineError, ValueError) as exc:
        _outcome(report, "step", exc)
    dist.barrier()
    report["refused"] = _refused(data_group, pipe)
    pipe.close()
    return report


def slow_replica(rank: int, world: int) -> float:
    """No failure, replica 0 late by :data:`DELAY` s: ``sync()`` on replica 1 waits for it
    (polling, with the failure check) and every gradient equals one process's mean over
    both replicas' batches. Returns how long ``sync()`` took here."""
    import copy

    from dualpipe.data_parallel import GradientSync

    from .training_workers import assert_grads_close, layer_pairs, reference_step

    _, pp_group, replica = _mesh(world)
    layers = build_layers(seed=3)
    ref = copy.deepcopy(layers)
    mine = split_model(layers, "1f1b", group=pp_group)
    pipe = Pipeline(mine, "1f1b", process_group=pp_group, timeout=60)
    sync = GradientSync(pipe)
    chunks = 4
    batches = [make_batch("mlp", 2 * chunks, seed=4 + r) for r in range(2)]
    (x,), y = batches[replica]
    inputs, labels = my_share(pipe, x, y)
    pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
    if replica == 0:
        time.sleep(DELAY)
    t0 = time.monotonic()
    sync()
    took = time.monotonic() - t0
    for (xr,), yr in batches:
        reference_step(ref, xr, yr, chunks, scale=0.5)
    assert_grads_close(layer_pairs(mine, ref))
    dist.barrier()
    pipe.close()
    return took


def patched_methods(rank: int, world: int) -> list[str]:
    """Inside ``polled_collectives`` (with a pipeline's transport), the reduce-scatter,
    all-gather and all-reduce FSDP2 would issue give the same values bit for bit as outside
    (the reduce-scatter runs as an all-reduce there), an ``async_op`` caller gets a work
    whose ``wait()`` checks failures, and the ``ProcessGroup`` methods are restored on
    exit."""
    from dualpipe.transport.guarded import polled_collectives

    before = {n: getattr(dist.ProcessGroup, n) for n in
              ("allreduce", "all_gather_single", "reduce_scatter_single")}
    pipe = Pipeline(split_model(build_layers(seed=3, n=4), "1f1b"), "1f1b", timeout=60)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(world * 5, generator=g)
    out = []

    def collectives() -> list[torch.Tensor]:
        got = []
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            part = torch.zeros(5)
            dist.reduce_scatter_single(part, x.clone(), op=op)
            got.append(part)
        full = torch.zeros(world * 5)
        work = dist.all_gather_single(full, x[:5].clone(), async_op=True)
        out.append(type(work).__name__)
        assert work is not None
        work.wait()
        summed = x.clone()
        dist.all_reduce(summed)
        return [*got, full, summed]

    plain = collectives()
    with polled_collectives(pipe.transport, "a test"):
        inside = collectives()
    assert all(torch.equal(a, b) for a, b in zip(plain, inside, strict=True))
    assert {n: getattr(dist.ProcessGroup, n) for n in before} == before
    pipe.close()
    return out
