"""Functions run on spawned ranks by tests/test_fsdp.py: pipeline stages wrapped in FSDP2
(``fully_shard``, HSDP), FSDP2's ``replicate`` and tensor parallelism, against one
process; collectives counted where FSDP2 issues them."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.runtime.extension import Extension
from dualpipe.runtime.kernels import Kernels
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.split import StageModule, split_model

from .runtime.models import DIM, criterion, make_batch
from .training_workers import build_layers, my_share

COUNTED = ("all_gather_single", "reduce_scatter_single", "all_reduce",
           "all_gather_into_tensor", "reduce_scatter_tensor")
"""The torch.distributed functions FSDP2 issues its collectives through (2.13 calls the
``*_single`` ones; the others are counted in case another version uses them)."""


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[tuple[str, tuple[int, ...]]]]:
    """Count calls of :data:`COUNTED` by (function, global ranks of the group)."""
    counts: Counter[tuple[str, tuple[int, ...]]] = Counter()
    originals = {name: getattr(dist, name) for name in COUNTED}

    def counting(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
            counts[(name, ranks)] += 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_grads(mine: list[StageModule], ref: list[nn.Module], what: str,
                  check: bool = True) -> float:
    """Largest per-tensor relative error of the stages' gradients (DTensors gathered)
    against the reference layers'; raises above 1e-5 when ``check``."""
    worst = 0.0
    for stage in mine:
        for i, layer in zip(stage.layer_ids, stage, strict=True):
            for (name, p), q in zip(layer.named_parameters(), ref[i].parameters(), strict=True):
                if p.grad is None and not check:
                    worst = float("inf")  # never reduced into the sharded parameter
                    continue
                assert p.grad is not None and q.grad is not None, f"{what}: layer {i} {name}"
                err = _rel_err(_full(p.grad), q.grad)
                worst = max(worst, err)
                assert not check or err <= 1e-5, (
                    f"{what}: layer {i} {name}: relative error {err:.3g}")
    return worst


def _reference(ref: list[nn.Module], xs: list[torch.Tensor], ys: list[torch.Tensor],
               chunks: int) -> None:
    """One process: the gradient of the mean loss over every micro-batch of every replica."""
    total = len(xs) * chunks
    for x, y in zip(xs, ys, strict=True):
        for xm, ym in zip(x.tensor_split(chunks), y.tensor_split(chunks), strict=True):
            h = xm
            for layer in ref:
                h = layer(h)
            (criterion(h, ym) / total).backward()


class TPMLP(nn.Module):
    """An MLP layer for tensor parallelism: Colwise ``up``, Rowwise ``down``."""

    def __init__(self, d: int = DIM) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


def _layers(seed: int, n: int, tp: bool) -> list[nn.Module]:
    if not tp:
        return build_layers(seed, n)
    torch.manual_seed(seed)
    return [TPMLP() for _ in range(n)]


def _wrap(stage: nn.Module, how: str, mesh: Any) -> None:
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.fsdp import fully_shard

    if how in ("fsdp", "fsdp-nosync"):
        fully_shard(stage, mesh=mesh["dp"])
    elif how == "fsdp-nested":  # every layer its own group, then the stage
        for layer in stage:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(stage, mesh=mesh["dp"])
    elif how == "fsdp-reshard":
        fully_shard(stage, mesh=mesh["dp"], reshard_after_forward=True)
    elif how == "hsdp":
        fully_shard(stage, mesh=mesh["rep", "dp"])
    elif how == "replicate":
        replicate(stage, mesh=mesh["dp"])
    elif how != "none":
        raise ValueError(how)


def _tensor_parallel(stage: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for layer in stage:
        parallelize_module(layer, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})


def run_composed(rank: int, world: int, schedules: list[str], how: str, dp: int, tp: int = 1,
                 rep: int = 1, split: bool = True, steps: int = 2, control: bool = False
                 ) -> list[dict[str, Any]]:
    """For each schedule: build the model, cut it for ``world // (dp * tp * rep)`` pipeline
    ranks, wrap each stage (``how``), run ``steps`` training steps (gradients accumulate)
    and one inference step, and check the gradients against one process after every step.
    Returns per schedule the collectives per step counted on this rank's data-parallel
    group, the number of FSDP2 parameter groups here and the worst relative error.
    ``control``: run without the extension (unregistered; parameters kept unsharded after
    backward so the ``W`` actions can run) and check nothing: the errors show what the
    test would catch."""
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe.integrations import fsdp_extension
    from dualpipe.integrations.fsdp import stage_param_groups
    from dualpipe.runtime.extension import unregister_extension

    if control:
        unregister_extension(fsdp_extension)

    pp = world // (dp * tp * rep)
    if rep > 1:
        mesh = init_device_mesh("cpu", (rep, dp, pp), mesh_dim_names=("rep", "dp", "pp"))
    elif tp > 1:
        mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
    else:
        mesh = init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    dp_ranks = tuple(dist.get_process_group_ranks(mesh.get_group("dp")))
    rep_ranks = tuple(dist.get_process_group_ranks(mesh.get_group("rep"))) if rep > 1 else ()
    replica = mesh.get_local_rank("dp") + (mesh.get_local_rank("rep") * dp if rep > 1 else 0)
    replicas = dp * rep
    out = []
    for schedule in schedules:
        layers = _layers(seed=5, n=8, tp=tp > 1)
        ref = copy.deepcopy(layers)
        mine = split_model(layers, schedule, group=pp_group)
        for stage in mine:
            if tp > 1:
                _tensor_parallel(stage, mesh)
            _wrap(stage, how, mesh)
            if control:  # (left alone, the W actions fail on the freed parameters instead)
                stage.set_reshard_after_backward(False)  # type: ignore[operator]
        pipe = Pipeline(mine, schedule, process_group=pp_group, timeout=60,
                        loss_reduction="mean", split_backward=split)
        groups = sum(len(stage_param_groups(m)[2]) for m in mine)
        chunks = 2 * pipe.num_ranks
        per_step = []
        worst = 0.0
        for step in range(steps):
            (x,), y = make_batch("mlp", replicas * 2 * chunks, seed=10 + step)
            xs, ys = list(x.chunk(replicas)), list(y.chunk(replicas))
            inputs, labels = my_share(pipe, xs[replica], ys[replica])
            if how == "fsdp-nosync":  # accumulate without communication until the last step
                for stage in mine:
                    stage.set_requires_gradient_sync(step == steps - 1)  # type: ignore[operator]
            with count_collectives() as counts:
                pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
            per_step.append(dict(counts))
            _reference(ref, xs, ys, chunks)
            if how == "fsdp-nosync" and step < steps - 1:
                assert all(p.grad is None for m in mine for p in m.parameters())
                continue
            worst = max(worst, compare_grads(mine, ref, f"{schedule} {how} step {step}",
                                             check=not control))
            if control:
                break
        if control:
            out.append({"schedule": schedule, "worst": worst})
            continue
        with torch.no_grad(), count_collectives() as counts:  # inference: no reduction
            (x,), y = make_batch("mlp", replicas * 2 * chunks, seed=99)
            inputs, _ = my_share(pipe, x.chunk(replicas)[replica], y)
            pipe.step(*inputs, num_chunks=chunks)
        inference = dict(counts)
        for stage in mine:  # parameters are resharded after every step
            for state_groups in stage_param_groups(stage)[2]:
                assert state_groups.is_sharded or not _sharded(state_groups), schedule
        pipe.close()
        out.append({"schedule": schedule, "groups": groups, "steps": per_step,
                    "inference": inference, "worst": worst, "dp_ranks": dp_ranks,
                    "rep_ranks": rep_ranks, "num_actions": _num_actions(pipe, chunks),
                    "runs": (_runs(pipe, chunks, True), _runs(pipe, chunks, False))})
    dist.barrier()
    return out


def _sharded(group: Any) -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo

    return isinstance(group.mesh_info, FSDPMeshInfo)


def _num_actions(pipe: Pipeline, chunks: int) -> dict[int, int]:
    """Actions per local module in one training step of ``pipe``'s schedule."""
    plan = pipe.executor.plan(pipe._schedule(chunks), True, True)
    counts: Counter[int] = Counter()
    for a in plan.actions:
        counts[a.module] += 1
    return dict(counts)


def _runs(pipe: Pipeline, chunks: int, training: bool) -> int:
    """Maximal runs of consecutive steps of the rank's plan that use one module, summed
    over the modules: what a stage that reshards between uses all-gathers per step."""
    plan = pipe.executor.plan(pipe._schedule(chunks), training, True)
    runs, before = 0, set()
    for step in plan.steps:
        now = {a.module for a in step.actions}
        runs += len(now - before)
        before = now
    return runs


class _StepLog(Extension):
    """Logs ``("start", k)`` and ``("end", k)`` around the compute of the rank's k-th step
    (the dispatch table's entries wrapped; a pair's halves are not logged again)."""

    name = "step-log"

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log
        self.depth = 0
        self.count = 0

    def kernels(self, table: Kernels) -> Kernels:
        def wrap(fn: Any) -> Any:
            def run(*args: Any) -> None:
                outer = self.depth == 0
                if outer:
                    self.log.append(("start", self.count))
                self.depth += 1
                try:
                    fn(*args)
                finally:
                    self.depth -= 1
                if outer:
                    self.log.append(("end", self.count))
                    self.count += 1
            return run

        return table.replace(**{k: wrap(getattr(table, k))
                                for k in ("forward", "backward", "input", "weight", "pair")})


class _TaggedAllGather:
    """An FSDP2 parameter group's all-gather, logging ``("ag", module)`` when issued."""

    def __init__(self, inner: Any, module: int, log: list[tuple[str, int]]) -> None:
        self.inner, self.module, self.log = inner, module, log

    def allocate(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.allocate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append(("ag", self.module))
        return self.inner(*args, **kwargs)


def run_prefetch_order(rank: int, world: int, configs: list[tuple[str, bool]]
                       ) -> list[dict[str, Any]]:
    """Stages with ``reshard_after_forward=True`` on 2 dp x 2 pp ranks, per ``(schedule,
    prefetch)``: one training step, gradients checked against one process (raises above
    1e-5); returns the local modules of each step of the rank's plan and the log of the
    step: compute start/end of every step and every all-gather issued, by module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe.integrations.fsdp import FSDPExtension, set_prefetch

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    replica = mesh.get_local_rank("dp")
    out = []
    for schedule, prefetch in configs:
        layers = _layers(seed=5, n=8, tp=False)
        ref = copy.deepcopy(layers)
        mine = split_model(layers, schedule, group=pp_group)
        for stage in mine:
            fully_shard(stage, mesh=mesh["dp"], reshard_after_forward=True)
        log: list[tuple[str, int]] = []
        pipe = Pipeline(mine, schedule, process_group=pp_group, timeout=60,
                        loss_reduction="mean", extensions=[_StepLog(log)])
        set_prefetch(pipe, prefetch)
        (ext,) = [e for e in pipe.extensions if isinstance(e, FSDPExtension)]
        assert ext.prefetch is prefetch
        for st in ext.stages:
            for g in st.groups:
                g._all_gather_comm = _TaggedAllGather(g._all_gather_comm, st.index, log)
        chunks = 2 * pipe.num_ranks
        (x,), y = make_batch("mlp", 2 * 2 * chunks, seed=10)
        xs, ys = list(x.chunk(2)), list(y.chunk(2))
        inputs, labels = my_share(pipe, xs[replica], ys[replica])
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        _reference(ref, xs, ys, chunks)
        worst = compare_grads(mine, ref, f"{schedule} prefetch={prefetch}")
        plan = pipe.executor.last_plan
        assert plan is not None
        steps = [sorted({a.module for a in s.actions}) for s in plan.steps]
        pending = [st.index for st in ext.stages for g in st.groups
                   if g._all_gather_result is not None]
        pipe.close()
        out.append({"schedule": schedule, "prefetch": prefetch, "steps": steps, "log": log,
                    "worst": worst, "pending": pending})
    dist.barrier()
    return out


def run_refusals(rank: int, world: int) -> list[str]:
    """What the extension refuses, on every rank, with errors that say what to do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    messages = []
    # a trainable parameter no FSDP2 module manages
    layers = build_layers(seed=1)
    mine = split_model(layers, "dualpipev", group=pp_group)
    for stage in mine:
        fully_shard(stage[0], mesh=mesh["dp"])  # only the first layer of each stage
    try:
        Pipeline(mine, "dualpipev", process_group=pp_group, timeout=30)
        raise AssertionError("a stage with unmanaged trainable parameters was accepted")
    except ValueError as exc:
        assert "apply fully_shard/replicate to the stage module itself" in str(exc), exc
        messages.append(str(exc))
    # one FSDP2 group over two stages of the rank
    layers = build_layers(seed=1)
    mine = split_model(layers, "dualpipev", group=pp_group)
    fully_shard(list(mine), mesh=mesh["dp"])
    try:
        Pipeline(mine, "dualpipev", process_group=pp_group, timeout=30)
        raise AssertionError("one FSDP2 group over two stages was accepted")
    except ValueError as exc:
        assert "spans more than one stage" in str(exc), exc
        messages.append(str(exc))
    # a weight tied between the rank's two stages, sharded twice: the tie would break
    layers = build_layers(seed=1)
    mine = split_model(layers, "dualpipev", group=pp_group)
    mine[1][0].net[0].weight = mine[0][0].net[0].weight
    for stage in mine:
        fully_shard(stage, mesh=mesh["dp"])
    try:
        Pipeline(mine, "dualpipev", process_group=pp_group, timeout=30)
        raise AssertionError("a weight tied across stages and sharded twice was accepted")
    except ValueError as exc:
        assert "breaks the tie" in str(exc), exc
        messages.append(str(exc))
    # DualPipe's mirrored copies on ranks with different data-parallel coordinates hold
    # different shards: summing them would be wrong
    crossed = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    my_pp = crossed[0] if rank in (0, 3) else crossed[1]
    layers = build_layers(seed=1)
    mine = split_model(layers, "dualpipe", group=my_pp)
    for stage in mine:
        fully_shard(stage, mesh=mesh["dp"])
    try:
        Pipeline(mine, "dualpipe", process_group=my_pp, timeout=30)
        raise AssertionError("mirrored copies holding different shards were accepted")
    except ValueError as exc:
        assert "hold different shards" in str(exc), exc
        messages.append(str(exc))
    dist.barrier()
    return messages


def run_failure_then_rebuild(rank: int, world: int, reshard: bool = False) -> dict[str, Any]:
    """A stage that raises (on pipeline rank 1 of both replicas) fails the step on every
    rank with the rank and action named; a new pipeline over the same FSDP2-wrapped stages
    and group then trains exactly (FSDP2's state was reset, partial gradients dropped).
    ``reshard``: stages with ``reshard_after_forward=True`` (prefetching); returns how many
    parameter groups had an all-gather on its way when the step failed, and after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe.errors import PipelineError
    from dualpipe.integrations.fsdp import stage_param_groups

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    replica = mesh.get_local_rank("dp")
    layers = _layers(seed=5, n=8, tp=False)
    ref = copy.deepcopy(layers)
    mine = split_model(layers, "dualpipev", group=pp_group)
    for stage in mine:
        fully_shard(stage, mesh=mesh["dp"], reshard_after_forward=True if reshard else None)
    armed = [True]

    def boom(module: nn.Module, args: Any) -> None:
        if armed[0]:
            raise RuntimeError("boom")

    pipe_rank = dist.get_rank(pp_group)
    handle = mine[1].register_forward_pre_hook(boom) if pipe_rank == 1 else None
    pipe = Pipeline(mine, "dualpipev", process_group=pp_group, timeout=60,
                    loss_reduction="mean")
    groups = [g for m in mine for g in stage_param_groups(m)[2]]
    pending: list[int] = []
    for ext in pipe.extensions:  # count the all-gathers on their way when the step fails
        if ext.name == "fsdp2":
            failed = ext.step_failed

            def counting(failed: Any = failed) -> None:
                pending.append(sum(g._all_gather_result is not None for g in groups))
                failed()
            ext.step_failed = counting  # type: ignore[method-assign]
    chunks = 2 * pipe.num_ranks
    (x,), y = make_batch("mlp", 2 * 2 * chunks, seed=10)
    xs, ys = list(x.chunk(2)), list(y.chunk(2))
    inputs, labels = my_share(pipe, xs[replica], ys[replica])
    try:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        raise AssertionError("the failing stage did not fail the step")
    except PipelineError as exc:
        message = str(exc)
        assert "rank 1 failed in F1." in message and "boom" in message, message
    pipe.close()
    pending.append(sum(g._all_gather_result is not None for g in groups))
    armed[0] = False
    if handle is not None:
        handle.remove()
    pipe = Pipeline(mine, "dualpipev", process_group=pp_group, timeout=60,
                    loss_reduction="mean")
    pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
    _reference(ref, xs, ys, chunks)
    compare_grads(mine, ref, "rebuilt after a failure")
    pipe.close()
    dist.barrier()
    return {"message": message, "pending": pending}
