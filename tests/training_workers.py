"""Functions run on spawned ranks by the training-feature tests (split, clipping, loss
reduction, metrics, data parallelism, checkpoints); see dualpipe.testing."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from dualpipe.runtime.pipeline import Pipeline
from dualpipe.split import StageModule, split_model

from .runtime.models import MLPStage, criterion, make_batch

LAYERS = 8


def build_layers(seed: int, n: int = LAYERS) -> list[nn.Module]:
    """The test model as a list of layers (same on every rank for one seed)."""
    torch.manual_seed(seed)
    return [MLPStage() for _ in range(n)]


def reference_step(
    layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor, chunks: int, scale: float = 1.0
) -> list[torch.Tensor]:
    """One process: per-micro-batch losses, and ``scale`` x the gradient of their sum
    accumulated into the layers' ``.grad``."""
    losses = []
    for xm, ym in zip(x.tensor_split(chunks), y.tensor_split(chunks), strict=True):
        h = xm
        for layer in layers:
            h = layer(h)
        loss = criterion(h, ym)
        (loss * scale if scale != 1.0 else loss).backward()
        losses.append(loss.detach())
    return losses


def layer_pairs(
    modules: list[StageModule], ref: list[nn.Module]
) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(name, pipeline parameter, reference parameter) for every layer held here."""
    out = []
    for stage in modules:
        for i, layer in zip(stage.layer_ids, stage, strict=True):
            for (name, p), q in zip(layer.named_parameters(), ref[i].parameters(), strict=True):
                out.append((f"layer {i} {name}", p, q))
    return out


def assert_grads_close(
    pairs: list[tuple[str, nn.Parameter, nn.Parameter]], rtol: float = 1e-5, atol: float = 1e-6
) -> None:
    for name, p, q in pairs:
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _ends(pipe: Pipeline) -> tuple[int | None, int | None]:
    paths = pipe.layout.paths
    start = next((s for s, path in enumerate(paths) if path[0][0] == pipe.rank), None)
    end = next((s for s, path in enumerate(paths) if path[-1][0] == pipe.rank), None)
    return start, end


def my_share(
    pipe: Pipeline, x: torch.Tensor, y: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """This pipeline rank's inputs and labels of a batch (DualPipe: halves per stream)."""
    start, end = _ends(pipe)
    xs, ys = x.chunk(pipe.layout.num_streams), y.chunk(pipe.layout.num_streams)
    return ((xs[start],) if start is not None else ()), ((ys[end],) if end is not None else ())


def check_step_features(rank: int, world: int, out: str) -> list[str]:
    """On DualPipe and DualPipeV with ``loss_reduction="mean"`` and ``broadcast_loss``:
    every rank gets every micro-batch's loss, bit-equal to one process; gradients are
    those of the mean loss; clip_grad_norm_ / grad_norm across the pipeline equal torch's
    on one process; step_metrics agree on every rank and the measured timeline is drawn
    (PNG and trace into ``out``)."""
    from pathlib import Path

    from dualpipe.clip import clip_grad_norm_, grad_norm
    from dualpipe.metrics import step_metrics

    report = []
    for schedule in ("dualpipe", "dualpipev"):
        layers = build_layers(seed=3)
        ref = copy.deepcopy(layers)
        mine = split_model(layers, schedule)
        pipe = Pipeline(mine, schedule, timeout=60, loss_reduction="mean")
        chunks = 2 * world
        (x,), y = make_batch("mlp", 4 * chunks, seed=4)
        inputs, labels = my_share(pipe, x, y)
        losses, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels,
                              record=True, broadcast_loss=True)
        expect_losses = reference_step(ref, x, y, chunks, scale=1.0 / chunks)
        assert losses is not None and torch.equal(losses, torch.stack(expect_losses))
        assert_grads_close(layer_pairs(mine, ref))  # the mean's gradients
        ref_params = [p for layer in ref for p in layer.parameters()]
        inf_norm = grad_norm(pipe, math.inf)
        expect_inf = max(p.grad.abs().max() for p in ref_params if p.grad is not None)
        assert torch.equal(inf_norm, expect_inf), (inf_norm, expect_inf)
        norm = clip_grad_norm_(pipe, max_norm=0.25)
        expect = torch.nn.utils.clip_grad_norm_(ref_params, max_norm=0.25)
        torch.testing.assert_close(norm, expect, rtol=1e-6, atol=0)
        assert norm > 0.25  # so the gradients were really scaled
        assert_grads_close(layer_pairs(mine, ref))
        report.append(f"{schedule}: norm {norm.item():.6f} (one process {expect.item():.6f})")

        metrics = step_metrics(pipe, tokens=4 * chunks)
        every: list[object] = [None] * world
        dist.all_gather_object(every, metrics.as_dict())
        assert all(m == every[0] for m in every), every  # the same on every rank
        assert metrics.step_ms > 0 and 0.0 <= metrics.bubble < 1.0
        assert len(metrics.idle_ms) == world
        assert metrics.tokens_per_s == 4 * chunks / (metrics.step_ms / 1000.0)
        timeline = pipe.gather_timeline()
        if rank == 0:
            assert timeline is not None
            timeline.save_png(Path(out) / f"{schedule}.png")
            timeline.save_trace(Path(out) / f"{schedule}.json")
    return report


def check_data_parallel(rank: int, world: int) -> list[str]:
    """DP x PP over a DeviceMesh (dp=2, pp=world/2): GradientSync (one all-reduce per bucket
    for DualPipe's copies and the replicas together) gives the one-process gradient of the
    whole batch; clipping afterwards too."""
    from torch.distributed.device_mesh import init_device_mesh

    from dualpipe.clip import clip_grad_norm_
    from dualpipe.data_parallel import GradientSync

    dp, pp = 2, world // 2
    mesh = init_device_mesh("cpu", (dp, pp), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    replica = mesh.get_local_rank("dp")
    report = []
    # DualPipe's copies would be summed twice: refused on every rank, before any message
    summing = Pipeline(split_model(build_layers(seed=7), "dualpipe", group=pp_group),
                       "dualpipe", process_group=pp_group, timeout=60)
    try:
        GradientSync(summing)
        raise AssertionError("GradientSync accepted a pipeline that sums its copies")
    except ValueError as exc:
        assert "sync_mirrored_grads=False" in str(exc), exc
    for schedule in ("dualpipe", "dualpipev"):
        layers = build_layers(seed=7)
        ref = copy.deepcopy(layers)
        mine = split_model(layers, schedule, group=pp_group)
        pipe = Pipeline(mine, schedule, process_group=pp_group, timeout=60,
                        sync_mirrored_grads=False)
        sync = GradientSync(pipe)  # average over replicas
        chunks = 2 * pp
        (x,), y = make_batch("mlp", dp * 2 * chunks, seed=8)
        xs, ys = x.chunk(dp), y.chunk(dp)
        inputs, labels = my_share(pipe, xs[replica], ys[replica])
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        sync()
        for d in range(dp):  # the whole batch on one process; the mean over replicas
            reference_step(ref, xs[d], ys[d], chunks, scale=1.0 / dp)
        assert_grads_close(layer_pairs(mine, ref))
        norm = clip_grad_norm_(pipe, max_norm=0.1)
        expect = torch.nn.utils.clip_grad_norm_([p for m in ref for p in m.parameters()], 0.1)
        torch.testing.assert_close(norm, expect, rtol=1e-6, atol=0)
        assert_grads_close(layer_pairs(mine, ref))
        report.append(f"{schedule} dp={dp} pp={pp}: group {sync.ranks}, ok")
    dist.barrier()
    return report


def step_losses(pipe: Pipeline, losses: torch.Tensor | None) -> list[float]:
    """Every micro-batch's loss of the step in global order (streams in order), on every
    rank (gathered over the pipeline group)."""
    _, end = _ends(pipe)
    mine = (end, losses.tolist()) if losses is not None else (None, [])
    every: list[tuple[int | None, list[float]]] = [(None, [])] * pipe.num_ranks
    dist.all_gather_object(every, mine, group=pipe.group)
    by_stream = {s: values for s, values in every if s is not None}
    return [v for s in sorted(by_stream) for v in by_stream[s]]


def checkpoint_run(
    rank: int,
    world: int,
    schedule: str,
    steps: int,
    load_from: str | None,
    save_to: str | None,
    save_after: int,
) -> dict[str, object]:
    """Train the test model with AdamW from scratch or from ``load_from`` (DCP), saving to
    ``save_to`` after step ``save_after``. Returns every step's losses (global order) and
    this rank's optimizer state (under the checkpoint's keys) at the save and right after
    the load."""
    from dualpipe import checkpoint

    layers = build_layers(seed=11)
    mine = split_model(layers, schedule)
    pipe = Pipeline(mine, schedule, timeout=60)
    optimizer = torch.optim.AdamW(unique(mine), lr=1e-2, weight_decay=0.1)
    chunks = 8
    def flat_optimizer_state() -> dict[str, list[float]]:
        state = checkpoint.optimizer_state_dict(pipe, optimizer)
        return {k: v.reshape(-1).tolist() for k, v in state.items()
                if isinstance(v, torch.Tensor)}

    first = 0
    loaded: dict[str, list[float]] = {}
    if load_from is not None:
        # a folder without a checkpoint is a clear error on every rank, not a hang
        try:
            checkpoint.load(load_from + "-missing", pipe, optimizer)
            raise AssertionError("loading a missing checkpoint succeeded")
        except checkpoint.CheckpointError as exc:
            assert "loading checkpoint" in str(exc) and "No such file" in str(exc), exc
        first = int(checkpoint.load(load_from, pipe, optimizer, extra={"step": -1})["step"])
        loaded = flat_optimizer_state()
    losses: dict[int, list[float]] = {}
    saved: dict[str, list[float]] = {}
    for step in range(first, steps):
        (x,), y = make_batch("mlp", 2 * chunks, seed=100 + step)
        inputs, labels = my_share(pipe, x, y)
        loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        losses[step] = step_losses(pipe, loss)
        optimizer.step()
        optimizer.zero_grad()
        if save_to is not None and step + 1 == save_after:
            checkpoint.save(save_to, pipe, optimizer, extra={"step": step + 1})
            saved = flat_optimizer_state()
    return {"losses": losses, "saved": saved, "loaded": loaded}


def unique(modules: list[StageModule]) -> list[nn.Parameter]:
    from dualpipe.stages import unique_parameters

    return unique_parameters(modules)


class Checkpointed(nn.Module):
    """A layer run under activation checkpointing (recomputed in the backward)."""

    def __init__(self, layer: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.layer = layer
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        out = checkpoint(self.layer, x, use_reentrant=self.reentrant)
        assert isinstance(out, torch.Tensor)
        return out


def _compare_step(
    pipe: Pipeline,
    mine: list[StageModule],
    ref: list[nn.Module],
    chunks: int,
    seed: int,
    exact_loss: bool,
    rtol: float,
    atol: float,
) -> float:
    """One step of ``pipe`` and of the one-process ``ref``; losses must be bit-equal (or
    close), gradients close. Returns the largest loss difference."""
    (x,), y = make_batch("mlp", 2 * chunks, seed=seed)
    inputs, labels = my_share(pipe, x, y)
    loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
    expect = torch.stack(reference_step(ref, x, y, chunks))
    diff = 0.0
    if loss is not None:
        if exact_loss:
            assert torch.equal(loss, expect), (loss, expect)
        diff = (loss - expect).abs().max().item()
        torch.testing.assert_close(loss, expect, rtol=rtol, atol=atol)
    assert_grads_close(layer_pairs(mine, ref), rtol=rtol, atol=atol)
    return diff


def check_compile_checkpointing_autocast(rank: int, world: int) -> list[str]:
    """DualPipeV on split stages: stages compiled by AOTAutograd (backend "aot_eager",
    donated buffers) equal eager bit for bit; an inductor-compiled stage (default split
    backward) equals one process running the same compiled layer bit for bit and eager to
    rounding;
    activation checkpointing (both kinds) is exact; bf16 autocast equals one process under
    autocast (losses bit-equal, gradients to bf16 rounding)."""
    report = []
    chunks = 2 * world
    # every stage compiled by AOTAutograd without a code generator (backend "aot_eager"):
    # donated buffers as with inductor, the same arithmetic as eager
    layers = build_layers(seed=20, n=2 * world)
    ref = copy.deepcopy(layers)
    mine = split_model(layers, "dualpipev")
    compiled = [torch.compile(m, backend="aot_eager") for m in mine]
    pipe = Pipeline(compiled, "dualpipev", timeout=120)
    for seed in (28, 29):
        for m in [*mine, *ref]:
            m.zero_grad(set_to_none=True)
        _compare_step(pipe, mine, ref, chunks, seed, exact_loss=True, rtol=1e-5, atol=1e-6)
    report.append("aot_eager-compiled stages: exact vs eager")

    # inductor: stage 1 (the middle of the V, whose input needs a gradient) on rank 1
    layers = build_layers(seed=21, n=2 * world)
    eager = copy.deepcopy(layers)
    ref = copy.deepcopy(layers)
    ref[1] = torch.compile(ref[1])
    mine = split_model(layers, "dualpipev")
    modules: list[nn.Module] = [torch.compile(m) if m.stage == 1 else m for m in mine]
    pipe = Pipeline(modules, "dualpipev", timeout=120)
    for seed in (30, 31):  # the second step runs the already-compiled code
        for m in [*mine, *ref, *eager]:
            m.zero_grad(set_to_none=True)
        _compare_step(pipe, mine, ref, chunks, seed, exact_loss=True, rtol=1e-5, atol=1e-6)
        (x,), y = make_batch("mlp", 2 * chunks, seed=seed)
        reference_step(eager, x, y, chunks)
        assert_grads_close(layer_pairs(mine, eager), rtol=1e-4, atol=1e-5)
    report.append("compiled stage: exact vs compiled one process, close to eager")

    # activation checkpointing: reentrant on layer 1, non-reentrant elsewhere
    base = build_layers(seed=22, n=2 * world)
    layers = [Checkpointed(m, reentrant=i == 1) for i, m in enumerate(base)]
    ref = copy.deepcopy(base)  # no checkpointing at all: recomputation changes nothing
    mine = split_model(layers, "dualpipev")
    pipe = Pipeline(mine, "dualpipev", timeout=60)
    _compare_step(pipe, mine, [Checkpointed(m, False) for m in ref], chunks, 32,
                  exact_loss=True, rtol=1e-5, atol=1e-6)
    report.append("activation checkpointing: exact")

    # bf16 autocast around the whole step
    layers = build_layers(seed=23, n=2 * world)
    ref = copy.deepcopy(layers)
    mine = split_model(layers, "dualpipev")
    pipe = Pipeline(mine, "dualpipev", timeout=60)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare_step(pipe, mine, ref, chunks, 33, exact_loss=True, rtol=2e-2, atol=2e-3)
    report.append("bf16 autocast: losses exact, gradients to bf16 rounding")
    return report


def wrapped_checkpoint_run(rank: int, world: int, path: str, save: bool) -> dict[str, object]:
    """Save (``save``) or load a DCP checkpoint of the test model on ``world`` DualPipeV
    ranks. Saving, the stages are wrapped: this rank's first stage whole by
    ``checkpoint_wrapper``, in its second the first layer by ``checkpoint_wrapper`` and the
    second layer by ``torch.compile``; loading, they are plain. Returns the model keys, the
    parameters by layer and the optimizer state (under the checkpoint's keys) after one
    step and the save, or right after the load."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from dualpipe import checkpoint

    layers = build_layers(seed=11 if save else 99)
    mine = split_model(layers, "dualpipev")
    modules: list[nn.Module] = list(mine)
    if save:
        first, second = mine
        second[0] = checkpoint_wrapper(second[0])
        second[1] = torch.compile(second[1], backend="eager")
        modules = [checkpoint_wrapper(first), second]
    pipe = Pipeline(modules, "dualpipev", timeout=60)
    optimizer = torch.optim.AdamW(unique(mine), lr=1e-2)
    if save:
        chunks = 2 * world
        (x,), y = make_batch("mlp", 2 * chunks, seed=5)
        inputs, labels = my_share(pipe, x, y)
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        optimizer.step()
        optimizer.zero_grad()
        checkpoint.save(path, pipe, optimizer)
    else:
        checkpoint.load(path, pipe, optimizer)
    return {"keys": sorted(checkpoint.stage_state_dict(pipe)),
            **_state_report(pipe, optimizer, mine)}


def _state_report(pipe: Pipeline, optimizer: torch.optim.Optimizer,
                  mine: list[StageModule]) -> dict[str, object]:
    """The parameters by layer key and the optimizer state under the checkpoint's keys,
    as flat lists (DTensor shards gathered into full tensors)."""
    from torch.distributed.tensor import DTensor

    from dualpipe import checkpoint

    def flat(t: torch.Tensor) -> list[float]:
        full = t.full_tensor() if isinstance(t, DTensor) else t
        return full.detach().reshape(-1).tolist()

    state = checkpoint.optimizer_state_dict(pipe, optimizer)
    return {
        "params": {f"{i}.{name}": flat(p)
                   for stage in mine for i, layer in zip(stage.layer_ids, stage, strict=True)
                   for name, p in _inner(layer).named_parameters()},
        "optim": {k: flat(v) for k, v in state.items() if isinstance(v, torch.Tensor)},
    }


def _inner(layer: nn.Module) -> nn.Module:
    """The layer behind checkpoint_wrapper / torch.compile."""
    for attr in ("_checkpoint_wrapped_module", "_orig_mod"):
        inner = getattr(layer, attr, None)
        if isinstance(inner, nn.Module):
            return _inner(inner)
    return layer


def fsdp_checkpoint_run(rank: int, world: int, path: str, save: bool) -> dict[str, object]:
    """Save on 2 data-parallel x 2 pipeline ranks with every stage ``fully_shard``-ed over
    the data-parallel dimension (after one training step), or load on ``world`` plain
    DualPipeV ranks. Returns the full parameters by layer key and the full optimizer state
    (DTensor shards gathered) after the save, or right after the load."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe import checkpoint

    layers = build_layers(seed=11 if save else 99)
    if save:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
        pp_group, pp_rank = mesh.get_group("pp"), mesh.get_local_rank("pp")
        mine = split_model(layers, "dualpipev", rank=pp_rank, num_ranks=2, group=pp_group)
        for stage in mine:
            fully_shard(stage, mesh=mesh["dp"])
        pipe = Pipeline(mine, "dualpipev", process_group=pp_group, timeout=60)
    else:
        pp_group = None
        mine = split_model(layers, "dualpipev")
        pipe = Pipeline(mine, "dualpipev", timeout=60)
    optimizer = torch.optim.AdamW(unique(mine), lr=1e-2)
    if save:
        chunks = 4
        (x,), y = make_batch("mlp", 4 * chunks, seed=5)
        replica = dist.get_rank() // 2
        x, y = x.chunk(2)[replica], y.chunk(2)[replica]
        inputs, labels = my_share(pipe, x, y)
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        optimizer.step()
        optimizer.zero_grad()
        checkpoint.save(path, pipe, optimizer)
    else:
        checkpoint.load(path, pipe, optimizer)
    out = _state_report(pipe, optimizer, mine)
    pipe.close()
    return out
