"""Benchmark: FSDP2 x DualPipeV on 2 data-parallel x 2 pipeline ranks (gloo, CPU): step
time and FSDP2 collectives per stage and step, ours (``dualpipe.Pipeline`` with the FSDP2
integration) vs torch's ``torch.distributed.pipelining.ScheduleDualPipeV``, with the same
``fully_shard``-ed stages of the same model in the same run.

    python benchmarks/bench_compose.py                 # default size
    python benchmarks/bench_compose.py --dim 512 --steps 10
    python benchmarks/bench_compose.py --reshard       # + reshard_after_forward=True rows

``--reshard`` adds two rows of ours with ``fully_shard(..., reshard_after_forward=True)``
(parameters freed between uses): the all-gathers prefetched one step ahead (the default)
and not (``set_prefetch(pipe, False)``).

Both runtimes get the same stages, the same per-replica batches and the gradient of the
mean loss (ours: ``loss_reduction="mean"``; torch: ``scale_grads=True``); after the first
step the two gradients are compared (largest per-tensor relative difference, printed).
Collectives are counted by wrapping the ``torch.distributed`` functions FSDP2 calls
(``all_gather_single``, ``reduce_scatter_single``, ``all_reduce``) while a step runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

COUNTED = ("all_gather_single", "reduce_scatter_single", "all_reduce",
           "all_gather_into_tensor", "reduce_scatter_tensor")


class Layer(nn.Module):
    """A residual MLP layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@contextlib.contextmanager
def _counting(counts: dict[str, int]) -> Iterator[None]:
    """Count calls of the collectives FSDP2 issues (by function name)."""
    originals = {name: getattr(dist, name) for name in COUNTED}

    def wrap(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return call

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(out, target)


def _runner(runtime: str, mine: list[Any], pp_group: Any, x: torch.Tensor, y: torch.Tensor,
            chunks: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(step, close)`` of one runtime over this rank's (FSDP2-wrapped) stages."""
    import torch.distributed.pipelining as tpp

    from dualpipe import Pipeline
    from dualpipe.integrations.fsdp import set_prefetch

    first = dist.get_rank(pp_group) == 0  # DualPipeV: inputs and loss on pipeline rank 0
    if runtime.startswith("ours"):
        pipe = Pipeline(mine, "dualpipev", process_group=pp_group, loss_reduction="mean",
                        timeout=300)
        if runtime == "ours-reshard-noprefetch":
            set_prefetch(pipe, False)

        def ours() -> None:
            if first:
                pipe.step(x, num_chunks=chunks, criterion=_loss, labels=(y,))
            else:
                pipe.step(num_chunks=chunks)

        return ours, pipe.close
    total = 2 * dist.get_world_size(pp_group)
    stages = [tpp.PipelineStage(m, m.stage, total, torch.device("cpu"), group=pp_group)
              for m in mine]
    sched = tpp.ScheduleDualPipeV(stages, n_microbatches=chunks, loss_fn=_loss,
                                  scale_grads=True)

    def theirs() -> None:
        if first:
            sched.step(x, target=y, losses=[])
        else:
            sched.step()

    return theirs, lambda: None


def compose_worker(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: for each runtime, build the model, shard the stages, time the steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dualpipe.split import split_model

    dp, dim, chunks, mb = cfg["dp"], cfg["dim"], cfg["chunks"], cfg["micro_batch"]
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "pp"))
    pp_group = mesh.get_group("pp")
    replica = mesh.get_local_rank("dp")
    torch.manual_seed(0)
    layers = [Layer(dim) for _ in range(cfg["layers"])]
    g = torch.Generator().manual_seed(1 + replica)
    x = torch.randn(chunks * mb, dim, generator=g)
    y = torch.randn(chunks * mb, dim, generator=g)
    out: dict[str, Any] = {}
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for runtime in cfg["runtimes"]:
        mine = split_model(copy.deepcopy(layers), "dualpipev", group=pp_group)
        for stage in mine:
            fully_shard(stage, mesh=mesh["dp"],
                        reshard_after_forward=True if "reshard" in runtime else None)
        step, close = _runner(runtime, mine, pp_group, x, y, chunks)
        times, per_step = [], []
        for i in range(cfg["warmup"] + cfg["steps"]):
            for m in mine:
                m.zero_grad(set_to_none=True)
            counts: dict[str, int] = {}
            dist.barrier()
            t0 = time.perf_counter()
            with _counting(counts):
                step()
            dist.barrier()
            if i == 0:
                grads[runtime] = {
                    f"{m.stage}.{n}": (p.grad.full_tensor() if isinstance(p.grad, DTensor)
                                       else p.grad).clone()
                    for m in mine for n, p in m.named_parameters() if p.grad is not None
                }
            if i >= cfg["warmup"]:
                times.append(time.perf_counter() - t0)
                per_step.append(counts)
        close()
        n = len(mine)
        out[runtime] = {
            "ms": 1000 * statistics.median(times),
            "ag": statistics.mean(c.get("all_gather_single", 0) for c in per_step) / n,
            "rs": statistics.mean(c.get("reduce_scatter_single", 0) for c in per_step) / n,
            "ar": statistics.mean(c.get("all_reduce", 0) for c in per_step) / n,
        }
    if "torch" in grads:
        b = grads["torch"]
        diffs = []
        for runtime, a in grads.items():
            if runtime == "torch":
                continue
            assert a.keys() == b.keys(), (runtime, sorted(a), sorted(b))
            diffs += [float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a]
        out["diff"] = max(diffs, default=0.0)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--reshard", action="store_true",
                        help="also ours with reshard_after_forward=True, prefetch on and off")
    args = parser.parse_args(argv)
    runtimes = ["ours", "torch"]
    if args.reshard:
        runtimes += ["ours-reshard", "ours-reshard-noprefetch"]

    import bench_compose
    from bench_launch import launch
    from bench_pipelines import run_header

    cfg = {"dp": 2, "dim": args.dim, "layers": args.layers, "chunks": args.chunks,
           "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
           "runtimes": runtimes}
    results = launch(bench_compose.compose_worker, 4, cfg, timeout=args.timeout)
    for line in run_header("bench_compose.py", argv):
        print(line)
    print(f"FSDP2 (fully_shard per stage) x DualPipeV, 2 dp x 2 pp, {args.layers} layers of "
          f"dim {args.dim}, {args.chunks} micro-batches of {args.micro_batch}; median of "
          f"{args.steps} steps after {args.warmup} warm-up steps")
    print(f"gradients, ours vs torch (largest per-tensor relative difference, first step): "
          f"{max(r.get('diff', 0.0) for r in results):.2e}")
    print()
    print("| runtime | rank | step ms | all-gathers / stage / step | "
          "reduce-scatters / stage / step |")
    print("|---|---|---|---|---|")
    for runtime in runtimes:
        for rank, r in enumerate(results):
            m = r[runtime]
            print(f"| {runtime} | {rank} | {m['ms']:.1f} | {m['ag']:.2f} | {m['rs']:.2f} |")


if __name__ == "__main__":
    main()
