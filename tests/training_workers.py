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


def check_clipping(rank: int, world: int) -> list[str]:
    """clip_grad_norm_ / grad_norm across the pipeline equal torch's on one process."""
    from dualpipe.clip import clip_grad_norm_, grad_norm

    report = []
    for schedule in ("dualpipe", "dualpipev"):
        layers = build_layers(seed=3)
        ref = copy.deepcopy(layers)
        mine = split_model(layers, schedule)
        pipe = Pipeline(mine, schedule, timeout=60)
        chunks = 2 * world
        (x,), y = make_batch("mlp", 4 * chunks, seed=4)
        inputs, labels = my_share(pipe, x, y)
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        reference_step(ref, x, y, chunks)
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
