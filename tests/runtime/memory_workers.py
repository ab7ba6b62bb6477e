"""Spawned-rank functions for the activation-memory test."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from dualpipe.runtime.kernels import DEFAULT_KERNELS
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules.registry import layout_for
from dualpipe.simulation import peak_activations

WIDTH = 4096  # one micro-batch's activation at one stage: WIDTH fp32 values per sample


class ScaleStage(nn.Module):
    """y = x * w: saves exactly one activation-sized tensor (x) per forward.

    While the pipeline runs, each forward also looks at what the executor holds:
    sent activations must not be kept for the backward (only their graph edges are),
    and the bytes of sends in flight are recorded."""

    run = None  # the step in progress (set by a spying forward handler)
    most_in_flight = 0
    held_output_tensors = 0

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((WIDTH,), 1.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex = ScaleStage.run
        if ex is not None:
            ScaleStage.most_in_flight = max(
                ScaleStage.most_in_flight, ex.transport.send_bytes_in_flight()
            )
            ScaleStage.held_output_tensors += sum(
                isinstance(r, torch.Tensor) and r.numel() > 1
                for roots, _ in ex.saved.values()
                for r in roots
            )
        return x * self.w


def scalar_loss(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Saves nothing activation-sized."""
    return (out.mean() - label.mean()) ** 2


class _Held:
    """A saved activation; counts itself while alive."""

    live = 0
    peak = 0

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        _Held.live += 1
        _Held.peak = max(_Held.peak, _Held.live)
        weakref.finalize(self, _Held._gone)

    @staticmethod
    def _gone() -> None:
        _Held.live -= 1


def _pack(t: torch.Tensor) -> object:
    if isinstance(t, nn.Parameter) or t.numel() != 2 * WIDTH:  # 2 samples per micro-batch
        return t
    return _Held(t)


def _unpack(x: object) -> torch.Tensor:
    return x.t if isinstance(x, _Held) else x  # type: ignore[return-value]


def measure_peak(
    rank: int, world: int, schedule: str, num_chunks: int
) -> tuple[int, int, int, int, int]:
    """Peak number of activation-sized tensors autograd holds on this rank during a step
    (each is one micro-batch at one stage), the simulator's peak for this rank, how
    many are still held after the step, how many output tensors the executor kept for
    backwards, and the most bytes of sends in flight at a forward."""
    layout = layout_for(schedule, world)
    mods = [ScaleStage() for _ in layout.rank_stages[rank]]
    pipe = Pipeline(mods, schedule, timeout=60)
    streams = layout.num_streams
    per_stream = 2 * num_chunks // streams
    x, y = torch.randn(per_stream, WIDTH), torch.randn(per_stream, WIDTH)
    start = any(p[0][0] == rank for p in layout.paths)
    end = any(p[-1][0] == rank for p in layout.paths)
    _Held.live = _Held.peak = 0
    def spying_forward(run, a) -> None:  # noqa: ANN001
        ScaleStage.run = run
        DEFAULT_KERNELS.forward(run, a)

    pipe.executor.kernels = pipe.executor.kernels.replace(forward=spying_forward)
    ScaleStage.most_in_flight = ScaleStage.held_output_tensors = 0
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        pipe.step(
            *((x,) if start else ()),
            num_chunks=num_chunks,
            criterion=scalar_loss,
            labels=(y,) if end else (),
        )
    ScaleStage.run = None
    assert pipe.executor.last_plan is not None
    schedule_obj = pipe.executor.last_plan.schedule
    return (
        _Held.peak,
        peak_activations(schedule_obj, rank),
        _Held.live,
        ScaleStage.held_output_tensors,
        ScaleStage.most_in_flight,
    )


def recorded_memory(rank: int, world: int, schedule: str, num_chunks: int) -> dict[str, object]:
    """A recorded step of 3 x (Linear, GELU) stages: the memory the runtime measured after
    every action, its peak and end in units of one stage activation (measured on the same
    stage in one process), this rank's simulated peak memory with the measured state per
    deferred W, and the step metrics' peak."""
    from dualpipe.autograd.memory import measure_stage_memory
    from dualpipe.metrics import step_metrics
    from dualpipe.simulation import peak_memory

    width, rows = 64, 8
    layout = layout_for("dualpipev" if schedule == "auto" else schedule, world)

    def stage(k: int) -> nn.Module:
        torch.manual_seed(k)
        return nn.Sequential(
            *[m for _ in range(3) for m in (nn.Linear(width, width), nn.GELU())]
        )

    probe = measure_stage_memory(stage(0), torch.randn(rows, width))
    plan: object = schedule
    if schedule == "auto":  # the auto-scheduler's, with the stage's measured W state
        from dualpipe.autoschedule import search
        from dualpipe.simulation import Costs

        plan = search(world, num_chunks, Costs(w_memory=probe.fraction)).schedule
        layout = plan.layout  # type: ignore[attr-defined]
    mods = [stage(k) for k in layout.rank_stages[rank]]
    pipe = Pipeline(mods, plan, timeout=60)  # type: ignore[arg-type]
    per_stream = num_chunks // layout.num_streams * rows
    x, y = torch.randn(per_stream, width), torch.randn(per_stream, width)
    start = any(p[0][0] == rank for p in layout.paths)
    end = any(p[-1][0] == rank for p in layout.paths)
    pipe.step(
        *((x,) if start else ()),
        num_chunks=num_chunks,
        criterion=lambda out, lab: ((out - lab) ** 2).mean(),
        labels=(y,) if end else (),
        record="memory",
    )
    record = pipe.last_record
    assert record is not None and pipe.executor.last_plan is not None
    metrics = step_metrics(pipe)
    unit = probe.activation_bytes
    held = [b for _, b in record.memory]
    return {
        "samples": len(record.memory),
        "steps": len(record.steps),
        "peak": max(held) / unit,
        "after": held[-1] / unit,
        "w_memory": probe.fraction,
        "sim": peak_memory(pipe.executor.last_plan.schedule, rank, probe.fraction),
        "metrics_peak": [b / unit for b in metrics.peak_memory_bytes],
    }


def record_without_memory(rank: int, world: int) -> tuple[int, int, str]:
    """``record=True`` on CPU times the step without memory samples; a bad ``record``
    value is refused on every rank."""
    torch.manual_seed(0)
    layout = layout_for("dualpipev", world)
    pipe = Pipeline([nn.Linear(8, 8) for _ in layout.rank_stages[rank]], "dualpipev",
                    timeout=30)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    args = (x,) if rank == 0 else ()
    labels = (y,) if rank == 0 else ()

    def loss(out: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return ((out - lab) ** 2).mean()

    pipe.step(*args, num_chunks=4, criterion=loss, labels=labels, record=True)
    assert pipe.last_record is not None
    steps, samples = len(pipe.last_record.steps), len(pipe.last_record.memory)
    try:
        pipe.step(*args, num_chunks=4, criterion=loss, labels=labels,
                  record="bytes")  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return steps, samples, str(exc)
    return steps, samples, ""
