"""Workers for the PyTorch-format interop tests: our schedules on PyTorch's pipelining
runtime, and PyTorch's generated schedules on ours (spawned gloo ranks)."""

from __future__ import annotations

import copy
import os
import tempfile

import torch

from dualpipe.schedules import from_torch_actions, generate, to_torch_csv

from ..schedules.torch_orders import zbv_rows
from .models import build_stages, criterion, make_batch
from .workers import _reference, check_pipeline


def run_ours_on_torch(rank: int, world: int, name: str, chunks: int) -> str:
    """Export ``name`` as PyTorch's CSV, load it into PyTorch's ``_PipelineScheduleRuntime``
    and train one step: losses bit-equal to one process, gradients to rounding."""
    import torch.distributed.pipelining as pp
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    schedule = generate(name, world, chunks)
    layout = schedule.layout
    stages = build_stages("mlp", layout.num_stages, seed=3)
    ref = copy.deepcopy(stages)
    ids = layout.rank_stages[rank]
    mine = [copy.deepcopy(stages[k]) for k in ids]
    total = layout.num_stages
    torch_stages = [
        pp.PipelineStage(m, k, total, torch.device("cpu")) for m, k in zip(mine, ids, strict=True)
    ]
    runtime = _PipelineScheduleRuntime(
        torch_stages, n_microbatches=chunks, loss_fn=criterion, scale_grads=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.csv")
        with open(path, "w", newline="") as f:
            f.write(to_torch_csv(schedule))
        runtime._load_csv(path)  # PyTorch's own loader (format "compute_only")
    inputs, labels = make_batch("mlp", 2 * chunks, seed=5)
    losses: list[torch.Tensor] = []
    args = inputs if 0 in ids else ()
    if total - 1 in ids:
        runtime.step(*args, target=labels, losses=losses)
    else:
        runtime.step(*args)
    ref_losses, _ = _reference(ref, [(inputs, labels)], chunks, train=True)
    if total - 1 in ids:
        assert torch.equal(torch.stack(losses), torch.stack(ref_losses[0])), (losses, ref_losses)
    for k, module in zip(ids, mine, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            assert p.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    return f"{name} on torch ok"


def run_torch_zbv_on_ours(rank: int, world: int, chunks: int) -> str:
    """PyTorch's generated ZBV order, imported, run by our Pipeline (exact, via the
    common check)."""
    schedule = from_torch_actions(zbv_rows(world, chunks), name="torch-zbv")
    assert schedule.steps == generate("zbv", world, chunks).steps
    return check_pipeline(rank, world, schedule, "mlp", [chunks])[0]
