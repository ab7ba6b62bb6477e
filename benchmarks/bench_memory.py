"""Benchmark: peak memory each rank holds during a step, ours vs torch, against the simulator.

Run ``python benchmarks/bench_memory.py`` (``--quick``: N = 2 only). The stage is the
issue's: 3 x (Linear 256->256, GELU), 32 rows of fp32 per micro-batch; one *unit* is what
one forward of it saves for its backward (6 tensors of 32 x 256). In one run:

1. *Per stage* (one process, :func:`dualpipe.autograd.measure_stage_memory`): what a
   deferred weight gradient holds between ``I`` and ``W``, in units, for this MLP stage
   (interior stage and first stage, whose input gets no gradient), an attention block
   and an MoE block (experts with grouped weights).
2. *Per rank* (N = 2 and 4 ranks, 2N and 4N micro-batches, gloo on local processes):
   every storage an operation creates on the rank during the step is followed until
   freed (a ``TorchDispatchMode``; parameters, their gradients and the step's input
   batch excluded); the held bytes are sampled after every action and at the end of the
   step. Ours: DualPipeV, ZBV and the auto-scheduler's schedule (searched with the
   stage's measured ``w_memory``); torch: ``ScheduleDualPipeV`` and
   ``ScheduleZBVZeroBubble`` on the same stages. ``sim`` is our simulator's
   ``peak_memory`` of the same schedule with the measured ``w_memory``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dualpipe.autograd.memory import StorageTracker, TrackCreated, measure_stage_memory  # noqa: E402
from dualpipe.testing import run_distributed  # noqa: E402

WIDTH, ROWS = 256, 32
UNIT = 6 * ROWS * WIDTH * 4  # bytes one forward of the MLP stage saves


def mlp_stage(seed: int) -> nn.Module:
    """3 x (Linear 256->256, GELU)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(WIDTH, WIDTH), nn.GELU())])


class Attention(nn.Module):
    """Pre-norm self-attention block (explicit softmax, so every tensor is an autograd one)."""

    def __init__(self, dim: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class MoE(nn.Module):
    """Top-1 routed experts with grouped weights (one (E, d, h) tensor per projection)."""

    def __init__(self, dim: int = 256, hidden: int = 512, experts: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, experts)
        self.w1 = nn.Parameter(torch.randn(experts, dim, hidden) / dim**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, dim) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(0, -2)
        probs = torch.softmax(self.gate(h), dim=-1)
        top, idx = probs.max(dim=-1)
        out = torch.zeros_like(h)
        for e in range(self.w1.shape[0]):
            rows = (idx == e).nonzero(as_tuple=True)[0]
            y = torch.nn.functional.gelu(h[rows] @ self.w1[e]) @ self.w2[e]
            out = out.index_add(0, rows, y * top[rows, None])
        return x + out.view_as(x)


def stage_table() -> list[tuple[str, float, float, float]]:
    """(block, activation units of the MLP stage's unit, deferred units, fraction)."""
    torch.manual_seed(0)
    rows = []
    cases: list[tuple[str, Callable[[], nn.Module], torch.Tensor, bool]] = [
        ("MLP 3 x (Linear, GELU)", lambda: mlp_stage(0), torch.randn(ROWS, WIDTH), True),
        ("MLP, first stage", lambda: mlp_stage(0), torch.randn(ROWS, WIDTH), False),
        ("attention block", Attention, torch.randn(2, 64, WIDTH), True),
        ("MoE block (4 experts)", MoE, torch.randn(2, 64, WIDTH), True),
    ]
    for name, build, x, grad in cases:
        m = measure_stage_memory(build(), x, input_grad=grad)
        rows.append((name, m.activation_bytes, m.deferred_bytes, m.fraction))
    return rows


# ------------------------------------------------------------------ per rank


def _criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _torch_criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def rank_worker(rank: int, world: int, impl: str, name: str, chunks: int,
                w_memory: float) -> dict[str, Any]:
    """One rank: peak and final held bytes during one step, and this rank's simulated
    peak memory (in units)."""
    from dualpipe.schedules import generate
    from dualpipe.simulation import Costs, peak_memory

    costs = Costs(w_memory=w_memory)
    if name == "auto":
        from dualpipe.autoschedule import search

        schedule = search(world, chunks, costs).schedule
    else:
        schedule = generate(name, world, chunks)
    layout = schedule.layout
    ids = layout.rank_stages[rank]
    modules = [mlp_stage(100 + k) for k in ids]
    params = [p for m in modules for p in m.parameters()]
    torch.manual_seed(7)
    x = torch.randn(chunks * ROWS, WIDTH)
    y = torch.randn(chunks * ROWS, WIDTH)
    first, last = 0 in ids, layout.num_stages - 1 in ids
    tracker = StorageTracker()
    samples: list[int] = []

    def sample() -> None:
        grads = [p.grad for p in params if p.grad is not None]
        samples.append(tracker.held([*params, *grads, x, y]))

    if impl == "ours":
        from dualpipe.runtime.pipeline import Pipeline

        pipe = Pipeline(modules, schedule, timeout=60)
        k = pipe.executor.kernels

        def after(fn: Callable[..., None]) -> Callable[..., None]:
            def wrapped(*args: Any) -> None:
                fn(*args)
                sample()

            return wrapped

        pipe.executor.kernels = k.replace(
            forward=after(k.forward), backward=after(k.backward), input=after(k.input),
            weight=after(k.weight), pair=after(k.pair),
        )

        def step() -> None:
            pipe.step(*((x,) if first else ()), num_chunks=chunks, criterion=_criterion,
                      labels=(y,) if last else ())
    else:
        import torch.distributed.pipelining as pp

        stages = [pp.PipelineStage(m, k, layout.num_stages, torch.device("cpu"))
                  for m, k in zip(modules, ids, strict=True)]
        for st in stages:
            for meth in ("forward_one_chunk", "backward_one_chunk",
                         "backward_weight_one_chunk"):
                fn = getattr(st, meth)

                def wrapped(*a: Any, _fn: Callable[..., Any] = fn, **kw: Any) -> Any:
                    out = _fn(*a, **kw)
                    sample()
                    return out

                setattr(st, meth, wrapped)
        cls = {"dualpipev": pp.ScheduleDualPipeV, "zbv": pp.ScheduleZBVZeroBubble}[name]
        sched = cls(stages, n_microbatches=chunks, loss_fn=_torch_criterion, scale_grads=False)

        def step() -> None:
            if last:
                sched.step(*((x,) if first else ()), target=y, losses=[])
            else:
                sched.step(*((x,) if first else ()))

    with TrackCreated(tracker):
        step()
    sample()
    final = samples[-1]
    recorded = None
    if impl == "ours":  # the runtime's own record: message buffers left out
        for m in modules:
            m.zero_grad(set_to_none=True)
        pipe.step(*((x,) if first else ()), num_chunks=chunks, criterion=_criterion,
                  labels=(y,) if last else (), record="memory")
        assert pipe.last_record is not None
        recorded = max(b for _, b in pipe.last_record.memory) / UNIT
        pipe.close()
    return {
        "peak": max(samples) / UNIT,
        "after": final / UNIT,
        "sim": peak_memory(schedule, rank, w_memory),
        "recorded": recorded,
    }


def run(quick: bool) -> list[dict[str, Any]]:
    stages = stage_table()
    print("Deferred weight-gradient state per micro-batch (one process):")
    print(f"| {'block':<24} | {'activation bytes':>16} | {'deferred bytes':>14} | "
          f"{'W state / activation':>20} |")
    print(f"|{'-' * 26}|{'-' * 18}|{'-' * 16}|{'-' * 22}|")
    for name, act, dfr, frac in stages:
        print(f"| {name:<24} | {act:>16} | {dfr:>14} | {frac:>20.3f} |")
    print(f"(MLP unit = {UNIT} bytes; W reads 3 Linear inputs + their 3 output gradients"
          f" = 1.000 unit)")
    w_memory = stages[0][3]
    rows = []
    for n in (2,) if quick else (2, 4):
        for chunks in (2 * n, 4 * n):
            for impl, name in (("ours", "dualpipev"), ("torch", "dualpipev"), ("ours", "zbv"),
                               ("torch", "zbv"), ("ours", "auto")):
                res = run_distributed(rank_worker, n, impl, name, chunks, w_memory, timeout=180)
                rows.append({"ranks": n, "chunks": chunks, "impl": impl, "schedule": name,
                             "peak": [r["peak"] for r in res], "after": [r["after"] for r in res],
                             "sim": [r["sim"] for r in res],
                             "recorded": [r["recorded"] for r in res]})
    print()
    print(f"Peak held memory per rank, in units (w_memory = {w_memory:.3f} measured above):")
    print("(measured: every storage the step creates on the rank; recorded: the runtime's"
          " record=\"memory\", message buffers left out)")
    print(f"| {'N':>2} | {'micro-batches':>13} | {'schedule':<16} |"
          f" {'measured peak per rank':<28} | {'recorded peak per rank':<28} |"
          f" {'simulated peak_memory':<28} | {'held after step':<24} |")
    print(f"|{'-' * 4}|{'-' * 15}|{'-' * 18}|{'-' * 30}|{'-' * 30}|{'-' * 30}|{'-' * 26}|")
    for r in rows:
        def fmt(v: list[float | None]) -> str:
            return " ".join("—" if x is None else f"{x:.2f}" for x in v)

        label = f"{r['impl']} {r['schedule']}"
        print(f"| {r['ranks']:>2} | {r['chunks']:>13} | {label:<16} | {fmt(r['peak']):<28} |"
              f" {fmt(r['recorded']):<28} | {fmt(r['sim']):<28} | {fmt(r['after']):<24} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 2 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.quick)


if __name__ == "__main__":
    main()
