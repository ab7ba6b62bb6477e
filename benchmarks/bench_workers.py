"""What every rank runs in a benchmark configuration (started by :mod:`bench_launch`).

A configuration is a plain dict (picklable) describing the runtime (``ours`` or
``torch``), the schedule, the stages and the batch. Each worker builds this
rank's part of the pipeline, runs warm-up steps, then times every step between
two barriers, and returns its measurements to the parent.

Runtimes and schedules:

* ``ours``: :class:`dualpipe.runtime.pipeline.Pipeline` with ``dualpipe``,
  ``dualpipev``, ``1f1b`` or ``zb1p``; rank ``r`` holds ``layout.rank_stages[r]``.
* ``torch``: ``torch.distributed.pipelining`` (public API only) with
  ``PipelineStage`` and ``ScheduleDualPipeV`` / ``ScheduleZBVZeroBubble`` (two
  stages per rank, V placement: rank r holds stages r and 2N-1-r, like ours) or
  ``Schedule1F1B`` (stage r on rank r).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bench_gpt
import bench_stages
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "TORCH_SCHEDULES",
    "TORCH_TO_OURS",
    "num_stages",
    "sleep_runner",
    "sleep_worker",
    "gpt_worker",
    "pingpong_worker",
]

TORCH_SCHEDULES = {
    "DualPipeV": "ScheduleDualPipeV",
    "ZBV": "ScheduleZBVZeroBubble",
    "1F1B": "Schedule1F1B",
}
"""Short name -> class name in ``torch.distributed.pipelining``."""

TORCH_TO_OURS = {"DualPipeV": "dualpipev", "ZBV": "zbv", "1F1B": "1f1b"}
"""Short torch name -> our registry name of the same schedule (same layout)."""


def _layout(schedule: str, ranks: int) -> Any:
    from dualpipe.schedules.registry import layout_for

    return layout_for(TORCH_TO_OURS.get(schedule, schedule), ranks)


def num_stages(schedule: str, ranks: int) -> int:
    """Model stages of ``schedule`` (ours or a torch short name) on ``ranks`` ranks."""
    return int(_layout(schedule, ranks).num_stages)


def _stage_ids(impl: str, schedule: str, rank: int, ranks: int) -> tuple[int, ...]:
    return tuple(_layout(schedule, ranks).rank_stages[rank])


@dataclass
class _Runner:
    """One rank's pipeline: ``step()`` runs one training step of the whole batch."""

    step: Callable[[], None]
    modules: list[nn.Module]
    actions: int
    order: list[str] | None = None
    record_step: Callable[[], dict[str, Any] | None] | None = None
    close: Callable[[], None] | None = None
    """Releases the runtime's threads and buffers (ours: ``Pipeline.close``)."""


def _ours(
    cfg: dict[str, Any],
    rank: int,
    ranks: int,
    modules: list[nn.Module],
    make_stream_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    criterion: Callable[..., torch.Tensor],
) -> _Runner:
    from dualpipe.runtime.pipeline import Pipeline
    from dualpipe.schedules.generators import generate
    from dualpipe.schedules.registry import layout_for

    name, chunks = cfg["schedule"], cfg["chunks"]
    layout = layout_for(name, ranks)
    pipe = Pipeline(modules, name, timeout=cfg["timeout"],
                    static_shapes=cfg.get("static_shapes"))
    per_stream = chunks // layout.num_streams
    batches = [make_stream_batch(per_stream) for _ in range(layout.num_streams)]
    start = layout.streams_starting_on(rank)
    end = layout.streams_ending_on(rank)
    inputs = (batches[start[0]][0],) if start else ()
    labels = (batches[end[0]][1],) if end else ()

    def step() -> None:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)

    def record_step() -> dict[str, Any] | None:
        pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels, record=True)
        timeline = pipe.gather_timeline()
        if timeline is None:
            return None
        return {
            "makespan": timeline.makespan,
            "busy": timeline.busy,
            "waits": [sum(w.end - w.start for w in row) for row in timeline.waits],
            "steps": [len(row) for row in timeline.steps],
        }

    actions = sum(1 for _ in generate(name, ranks, chunks).actions(rank))
    return _Runner(step, modules, actions, None, record_step, pipe.close)


def _torch_actions(sched: Any, rank: int, chunks: int) -> int:
    """Compute actions (F, B, I, W; an overlapped F+B counts as two) of ``rank``."""
    order = getattr(sched, "pipeline_order", None)
    if not order:
        return 2 * chunks  # single-stage schedules: one F and one B per micro-batch
    count = 0
    for action in order[rank]:
        if action is None:
            continue
        subs = getattr(action, "sub_actions", None) or (action,)
        count += sum(1 for a in subs if getattr(a.computation_type, "value", None) in _COMPUTE)
    return count


_COMPUTE = {"F", "B", "I", "W"}


def _torch_order(sched: Any, rank: int, ranks: int) -> list[str] | None:
    """``rank``'s compute actions of a multi-stage torch schedule as our step tokens
    (``F0.3``, ``I1.2``, ``W1.2``, ``F0.4+B1.0``), for our simulator; None for
    single-stage schedules (their order is plain 1F1B)."""
    order = getattr(sched, "pipeline_order", None)
    if not order:
        return None

    def token(a: Any) -> str | None:
        kind = getattr(a.computation_type, "value", None)
        if kind not in _COMPUTE:
            return None
        phase = 0 if a.stage_index < ranks else 1
        return f"{kind}{phase}.{a.microbatch_index}"

    tokens = []
    for action in order[rank]:
        if action is None:
            continue
        subs = getattr(action, "sub_actions", None)
        if subs:
            parts = [t for t in map(token, subs) if t is not None]
            tokens.append("+".join(parts))
        else:
            t = token(action)
            if t is not None:
                tokens.append(t)
    return tokens


def _instrument(stage: Any, tally: dict[str, dict[str, int]]) -> None:
    """Count which sleep-stage branches run inside each kind of torch backward call."""
    one_chunk, weight_chunk = stage.backward_one_chunk, stage.backward_weight_one_chunk

    def measure(kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        before = dict(bench_stages.COUNTS)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        row = tally.setdefault(f"S{stage.stage_index}:{kind}", {"calls": 0, "input": 0,
                                                                "weight": 0, "ms": 0})
        row["calls"] += 1
        row["ms"] += round((time.perf_counter() - t0) * 1000)
        for key in ("input", "weight"):
            row[key] += bench_stages.COUNTS[key] - before[key]
        return result

    def backward_one_chunk(*args: Any, **kwargs: Any) -> Any:
        full = kwargs.get("full_backward", args[2] if len(args) > 2 else True)
        return measure("B" if full else "I", one_chunk, *args, **kwargs)

    def backward_weight_one_chunk(*args: Any, **kwargs: Any) -> Any:
        return measure("W", weight_chunk, *args, **kwargs)

    stage.backward_one_chunk = backward_one_chunk
    stage.backward_weight_one_chunk = backward_weight_one_chunk


def _torch(
    cfg: dict[str, Any],
    rank: int,
    ranks: int,
    modules: list[nn.Module],
    stage_ids: tuple[int, ...],
    make_stream_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    criterion: Callable[..., torch.Tensor],
    tally: dict[str, dict[str, int]] | None,
) -> _Runner:
    import torch.distributed.pipelining as pp

    name, chunks = cfg["schedule"], cfg["chunks"]
    total = num_stages(name, ranks)
    device = torch.device("cpu")
    stages = [
        pp.PipelineStage(m, sid, total, device) for m, sid in zip(modules, stage_ids, strict=True)
    ]
    if tally is not None:
        for stage in stages:
            _instrument(stage, tally)
    cls = getattr(pp, TORCH_SCHEDULES[name])
    sched = cls(
        stages if len(stages) > 1 else stages[0],
        n_microbatches=chunks,
        loss_fn=criterion,
        scale_grads=False,
    )
    x, y = make_stream_batch(chunks)
    args = (x,) if 0 in stage_ids else ()
    last = total - 1 in stage_ids

    def step() -> None:
        if last:
            sched.step(*args, target=y, losses=[], return_outputs=False)
        else:
            sched.step(*args, return_outputs=False)

    return _Runner(step, modules, _torch_actions(sched, rank, chunks),
                   _torch_order(sched, rank, ranks))


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads, user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time_steps(runner: _Runner, warmup: int, steps: int) -> tuple[list[float], float]:
    """Seconds of each timed step (between barriers) after ``warmup`` untimed steps, and
    the CPU seconds this process used per timed step."""
    times = []
    cpu = 0.0
    for i in range(warmup + steps):
        for m in runner.modules:
            m.zero_grad(set_to_none=True)
        dist.barrier()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()
        runner.step()
        c1 = _cpu_seconds()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu += c1 - c0
    return times, cpu / max(steps, 1)


def sleep_runner(
    rank: int, ranks: int, cfg: dict[str, Any],
    tally: dict[str, dict[str, int]] | None = None,
) -> _Runner:
    """This rank's pipeline of a sleep-stage configuration (see :func:`sleep_worker` for
    ``cfg``); ``tally`` (torch) collects branch counts per backward call."""
    impl, name = cfg["impl"], cfg["schedule"]
    ids = _stage_ids(impl, name, rank, ranks)
    stages = bench_stages.build_sleep_stages(num_stages(name, ranks), cfg["f"], cfg["b"],
                                             cfg["w"])
    modules: list[nn.Module] = [stages[k] for k in ids]
    numel = cfg["numel"]

    def make_stream_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(n, numel)
        if cfg.get("input_grad"):
            x.requires_grad_(True)
        return x, torch.zeros(n, 1)

    if impl == "ours":
        return _ours(cfg, rank, ranks, modules, make_stream_batch, bench_stages.sleep_loss)
    return _torch(cfg, rank, ranks, modules, ids, make_stream_batch, bench_stages.sleep_loss,
                  tally)


def sleep_worker(rank: int, ranks: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank of a sleep-stage configuration.

    ``cfg`` keys: ``impl`` (ours|torch), ``schedule``, ``chunks``, ``f``/``b``/``w`` (ms),
    ``numel`` (fp32 elements per micro-batch activation), ``warmup``, ``steps``,
    ``timeout``, optionally ``instrument`` (torch: count branches per backward call),
    ``input_grad`` (the pipeline input requires grad) and ``static_shapes`` (ours:
    passed to the Pipeline; default: its own default).
    """
    tally: dict[str, dict[str, int]] | None = {} if cfg.get("instrument") else None
    runner = sleep_runner(rank, ranks, cfg, tally)
    _time_steps(runner, cfg["warmup"], 0)
    bench_stages.reset_counts()
    if tally is not None:
        tally.clear()
    times, cpu = _time_steps(runner, 0, cfg["steps"])
    counts = {k: v / cfg["steps"] for k, v in bench_stages.COUNTS.items()}
    sleeps, overshoot = bench_stages.SLEPT
    recorded = None
    if cfg.get("timeline") and runner.record_step is not None:
        dist.barrier()
        recorded = runner.record_step()
    return {
        "times": times,
        "cpu": cpu,
        "actions": runner.actions,
        "counts": counts,
        "overshoot_ms": overshoot / sleeps if sleeps else 0.0,
        "tally": tally,
        "stages": _stage_ids(cfg["impl"], cfg["schedule"], rank, ranks),
        "order": runner.order,
        "timeline": recorded,
    }


def gpt_worker(rank: int, ranks: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank of the GPT configuration (DualPipeV: ours or torch's ScheduleDualPipeV).

    ``cfg`` keys: ``impl``, ``schedule`` (``dualpipev``/``DualPipeV``), ``chunks``,
    ``shape`` (a :class:`bench_gpt.GPTShape`), ``warmup``, ``steps``, ``timeout``.
    """
    impl, name, shape = cfg["impl"], cfg["schedule"], cfg["shape"]
    ids = _stage_ids(impl, name, rank, ranks)
    stages = bench_gpt.gpt_stages(shape, num_stages(name, ranks), seed=0)
    modules = [stages[k] for k in ids]

    def make_stream_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return bench_gpt.gpt_batch(shape, n * shape.mb)

    if impl == "ours":
        runner = _ours(cfg, rank, ranks, modules, make_stream_batch, bench_gpt.gpt_loss)
    else:
        runner = _torch(cfg, rank, ranks, modules, ids, make_stream_batch, bench_gpt.gpt_loss,
                        None)
    times, cpu = _time_steps(runner, cfg["warmup"], cfg["steps"])
    return {"times": times, "cpu": cpu, "actions": runner.actions}


def pingpong_worker(rank: int, ranks: int, numels: list[int], reps: int) -> dict[int, float]:
    """Ranks 0 and 1 bounce fp32 tensors; returns, per size, the median one-way time (ms)
    (half the round trip)."""
    del ranks
    out: dict[int, float] = {}
    for numel in numels:
        t = torch.zeros(numel)
        rtts = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            # isend/irecv + wait, as the pipelines use (blocking send/recv are slower)
            if rank == 0:
                dist.isend(t, 1).wait()
                dist.irecv(t, 1).wait()
            else:
                dist.irecv(t, 0).wait()
                dist.isend(t, 0).wait()
            if i >= 2:
                rtts.append(time.perf_counter() - t0)
        out[numel] = statistics.median(rtts) * 1000.0 / 2.0
    return out
