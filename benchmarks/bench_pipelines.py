"""Benchmark: our pipeline runtime vs torch.distributed.pipelining, side by side.

Run ``python benchmarks/bench_pipelines.py`` (``--quick`` for a smoke run, ``--help``
for the options). In one run it measures, on local gloo ranks:

1. *Sleep stages* (:mod:`bench_stages`): forward sleeps F ms, the input-gradient
   branch B ms, the weight-gradient branch W ms, so the ideal and simulated step
   times are known exactly and many ranks run in parallel on few cores. Ours
   (DualPipe, DualPipeV, 1F1B, ZB1P) and torch's (ScheduleDualPipeV,
   ScheduleZBVZeroBubble, Schedule1F1B) on the same stages, for every rank count,
   activation size and micro-batch count asked for.
2. *Zero-cost stages* (F = B = W = 0, tiny activations): runtime overhead per action.
3. *A real model* (:mod:`bench_gpt`): tokens per second of DualPipeV, ours vs torch.
4. *Communication*: one-way time of a message between two processes over gloo.

Before that it checks, once, that both runtimes' automatic backward splits really
separate the two branches of a sleep stage (see :func:`check_split`).

Every configuration runs in a fresh process group on fresh processes
(:mod:`bench_launch`) with a bounded timeout; a failing one prints an error row and
the run goes on. See ``benchmarks/README.md`` for what the columns mean.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import bench_gpt
import bench_launch
import bench_stages
import bench_workers
import torch

from dualpipe.errors import ScheduleError
from dualpipe.schedules.actions import parse_step
from dualpipe.schedules.generators import generate
from dualpipe.schedules.layout import dualpipev_layout
from dualpipe.schedules.registry import spec
from dualpipe.schedules.schedule import Schedule
from dualpipe.simulation import Costs, simulate

# (label, runtime, schedule name for the runtime, our schedule to simulate (None: the
# runtime's own order), torch counterpart label compared against)
ROWS: list[tuple[str, str, str, str | None, str | None]] = [
    ("DualPipe", "ours", "dualpipe", "dualpipe", None),
    ("DualPipeV", "ours", "dualpipev", "dualpipev", "torch DualPipeV"),
    ("torch DualPipeV", "torch", "DualPipeV", None, None),
    ("torch ZBV", "torch", "ZBV", None, None),
    ("1F1B", "ours", "1f1b", "1f1b", "torch 1F1B"),
    ("torch 1F1B", "torch", "1F1B", "1f1b", None),
    ("ZB1P", "ours", "zb1p", "zb1p", None),
    ("ZBV", "ours", "zbv", "zbv", "torch ZBV"),
]
"""Every schedule of a configuration, in table order."""



def _fits(impl: str, name: str, ranks: int) -> bool:
    """Whether our schedule ``name`` runs on ``ranks`` ranks (the registry's constraints)."""
    if impl != "ours":
        return True
    try:
        spec(name).check_ranks(ranks)
    except ScheduleError:
        return False
    return True


SIZES = {"4k": 1024, "4m": 1024 * 1024}
"""Activation sizes (fp32 elements per micro-batch)."""


def _size_label(numel: int) -> str:
    nbytes = 4 * numel
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):g} MiB"
    return f"{nbytes / 1024:g} KiB"


@dataclass
class Row:
    """One measured configuration."""

    section: str
    ranks: int
    size: str
    chunks: int
    label: str
    runtime: str
    step_ms: float | None = None
    min_ms: float | None = None
    ideal_ms: float | None = None
    sim_ms: float | None = None
    sim_comm_ms: float | None = None
    sim_slept_ms: float | None = None
    actions: int | None = None
    cpu_ms: float | None = None
    overshoot_ms: float | None = None
    tokens_per_s: float | None = None
    vs: str | None = None
    ratio: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def efficiency(self) -> float | None:
        """ideal / measured."""
        if self.step_ms and self.ideal_ms is not None:
            return self.ideal_ms / self.step_ms
        return None

    @property
    def overhead(self) -> float | None:
        """measured / simulated (comm = 0)."""
        if self.step_ms and self.sim_ms:
            return self.step_ms / self.sim_ms
        return None

    @property
    def overhead_comm(self) -> float | None:
        """measured / simulated with the measured message time as comm."""
        if self.step_ms and self.sim_comm_ms:
            return self.step_ms / self.sim_comm_ms
        return None

    @property
    def overhead_slept(self) -> float | None:
        """measured / simulated with the sleeps as they really lasted (costs + overshoot)."""
        if self.step_ms and self.sim_slept_ms:
            return self.step_ms / self.sim_slept_ms
        return None

    @property
    def per_action_ms(self) -> float | None:
        """measured / actions per rank (the busiest rank)."""
        if self.step_ms is not None and self.actions:
            return self.step_ms / self.actions
        return None

    @property
    def cpu_per_action_ms(self) -> float | None:
        """CPU time per rank and step (mean over ranks) / actions per rank."""
        if self.cpu_ms is not None and self.actions:
            return self.cpu_ms / self.actions
        return None


# ----------------------------------------------------------------------------- helpers


def _parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_size(token: str) -> int:
    t = token.lower()
    if t in SIZES:
        return SIZES[t]
    return int(t)


def _chunks_for(token: str, stages: int) -> int:
    """``2x`` -> 2 x stages; a number -> itself."""
    if token.endswith("x"):
        return int(float(token[:-1]) * stages)
    return int(token)


def _costs(f: float, b: float, w: float, comm: float = 0.0) -> Costs:
    return Costs(f=f, b=b + w, w=w, fb=f + b + w, comm=comm)


def torch_schedule(orders: Sequence[Sequence[str]], ranks: int, chunks: int) -> Schedule:
    """A torch V schedule's per-rank compute order as our :class:`Schedule` (V layout:
    rank r, phase 0 = stage r, phase 1 = stage 2N-1-r, as in torch)."""
    steps = tuple(tuple(parse_step(tok) for tok in row) for row in orders)
    return Schedule("torch", dualpipev_layout(ranks), chunks, steps)


def _median_step(results: list[dict[str, Any]]) -> tuple[float, float]:
    """(median, min) over steps of the slowest rank's time per step, in ms."""
    steps = len(results[0]["times"])
    per_step = [max(r["times"][i] for r in results) * 1000.0 for i in range(steps)]
    return statistics.median(per_step), min(per_step)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] or [type(exc).__name__]
    return f"{type(exc).__name__}: {tail[0][:160]}"


def _say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- checks


def _require(ok: bool, what: object) -> None:
    """A precondition of the measurement (the stages really split, as the table assumes):
    the run stops with ``what`` rather than print numbers that mean something else. The
    library's side of it is tested in tests/test_bench_stages.py."""
    if not ok:
        raise SystemExit(f"benchmark precondition failed: {what}")


def check_split(f: float, b: float, w: float) -> list[str]:
    """Check that our split backward separates a sleep stage's two branches.

    Single process: a middle stage (input requires grad), ``backward_input`` must run
    only the input branch (about B ms) and ``WeightGradWork.run`` only the weight
    branch (about W ms); stage 0 (input without grad) must defer everything. Raises
    ``AssertionError`` otherwise; returns report lines.
    """
    from dualpipe.autograd import backward_input

    lines = []
    b, w = max(b, 5.0), max(w, 5.0)  # keep the timing check meaningful for zero costs
    stage = bench_stages.SleepStage(0.0, b, w)
    for _ in range(2):  # the first call pays one-time costs (lazy imports): time the second
        x = torch.zeros(1, 1024, requires_grad=True)
        out = stage(x)
        bench_stages.reset_counts()
        t0 = time.perf_counter()
        grads, work = backward_input([out], [torch.zeros_like(out)], [x])
        t1 = time.perf_counter()
        after_input = dict(bench_stages.COUNTS)
        work.run()
        t2 = time.perf_counter()
        after_weight = dict(bench_stages.COUNTS)
    ms_i, ms_w = (t1 - t0) * 1000, (t2 - t1) * 1000
    _require(grads[0] is not None, "backward_input returned no input gradient")
    _require(after_input == {"forward": 0, "input": 1, "weight": 0}, after_input)
    _require(after_weight == {"forward": 0, "input": 1, "weight": 1}, after_weight)
    _require(b <= ms_i < b + 0.5 * w, f"backward_input took {ms_i:.1f} ms (B = {b} ms)")
    _require(w <= ms_w < w + 0.5 * b, f"WeightGradWork.run took {ms_w:.1f} ms (W = {w} ms)")
    lines.append(
        f"ours: backward_input ran the input branch only ({ms_i:.1f} ms, B = {b:g}); "
        f"WeightGradWork.run the weight branch only ({ms_w:.1f} ms, W = {w:g})"
    )
    first = bench_stages.build_sleep_stages(1, 0.0, b, w)[0]
    out = first(torch.zeros(1, 1024))
    bench_stages.reset_counts()
    t0 = time.perf_counter()
    _, work = backward_input([out], [torch.zeros_like(out)], [])
    t1 = time.perf_counter()
    _require(bench_stages.COUNTS["weight"] == 0, bench_stages.COUNTS)
    work.run()
    t2 = time.perf_counter()
    _require(bench_stages.COUNTS["weight"] == 1, bench_stages.COUNTS)
    lines.append(
        f"ours, stage 0 (input needs no grad): input-only backward {(t1 - t0) * 1000:.1f} ms, "
        f"weight pass {(t2 - t1) * 1000:.1f} ms (= B + W)"
    )
    return lines


def check_torch_split(f: float, b: float, w: float, timeout: float) -> list[str]:
    """Check torch's split: ZBV (only I and W backwards) on 2 ranks, instrumented.

    Every I of a stage > 0 must run only the input branch, every W only the weight
    branch; stage 0's I runs nothing and its W the whole backward. Raises
    ``AssertionError`` otherwise; returns report lines.
    """
    b, w = max(b, 2.0), max(w, 2.0)
    cfg = {
        "impl": "torch", "schedule": "ZBV", "chunks": 4, "f": 0.0, "b": b, "w": w,
        "numel": 1024, "warmup": 1, "steps": 1, "timeout": timeout, "instrument": True,
    }
    results = bench_launch.launch(bench_workers.sleep_worker, 2, cfg, timeout=timeout)
    seen: dict[str, list[int]] = {}
    for res in results:
        for key, row in res["tally"].items():
            stage, kind = key.split(":")
            calls, inp, wgt, ms = row["calls"], row["input"], row["weight"], row["ms"]
            if kind == "I":
                expect = (0, 0) if stage == "S0" else (calls, 0)
            elif kind == "W":
                expect = (0, calls) if stage == "S0" else (0, calls)
            else:
                expect = (calls if stage != "S0" else 0, calls)
            _require((inp, wgt) == expect, f"torch {key}: {row}")
            acc = seen.setdefault(kind if stage != "S0" else f"S0 {kind}", [0, 0])
            acc[0] += calls
            acc[1] += ms
    parts = [f"{k}: {c} calls, {ms / max(c, 1):.1f} ms each" for k, (c, ms) in sorted(seen.items())]
    return [
        "torch (ScheduleZBVZeroBubble, 2 ranks): I ran the input branch only, W the weight "
        f"branch only; stage 0's I nothing, its W the whole backward ({'; '.join(parts)})"
    ]


def sleep_overshoot(ms: float, reps: int = 30) -> float:
    """Median extra time (ms) ``time.sleep`` takes over ``ms`` in this process."""
    extra = []
    for _ in range(reps):
        t0 = time.perf_counter()
        bench_stages.sleep_ms(ms)
        extra.append((time.perf_counter() - t0) * 1000.0 - ms)
    return statistics.median(extra)


def _git_state() -> str:
    """The checkout's commit and whether src/ has uncommitted changes (read-only git)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root,
                               env=env, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "git state unknown"
    changed = len([line for line in dirty.splitlines() if line.strip()])
    return f"commit {head or '?'}" + (f" + {changed} uncommitted file(s) in src/" if changed
                                       else ", src/ clean")


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def run_header(script: str, argv: Sequence[str] | None) -> list[str]:
    """A benchmark's first two lines: the command that ran ``script`` (with ``argv``,
    default the process's), and the date, machine, versions and checkout."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    return [
        f"command: {cmd.strip()}",
        f"date: {when}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"torch {torch.__version__}; gloo on 127.0.0.1, 1 thread per rank; {_git_state()}",
    ]


# ----------------------------------------------------------------------------- runs


def measure_comm(numels: list[int], timeout: float) -> dict[int, float]:
    """Median one-way time (ms) of a message of each size between two gloo processes."""
    results = bench_launch.launch(bench_workers.pingpong_worker, 2, numels, 20, timeout=timeout)
    return results[0]


def _timeout(expected_ms: float, steps: int, ranks: int) -> float:
    return 60.0 + 5.0 * ranks + 4.0 * steps * expected_ms / 1000.0


def run_sleep(
    args: argparse.Namespace, comm: dict[int, float], rows_out: list[Row], section: str,
    f: float, b: float, w: float, ranks_list: list[int], sizes: list[int],
    chunk_tokens: list[str], steps: int, warmup: int,
) -> None:
    """Measure every schedule of every (ranks, size, chunks) sleep configuration."""
    for ranks in ranks_list:
        for numel in sizes:
            for token in chunk_tokens:
                group: dict[str, Row] = {}
                for label, impl, name, sim_name, vs in ROWS:
                    if args.only and impl != args.only:
                        continue
                    if args.schedules and label not in args.schedules:
                        continue
                    if not _fits(impl, name, ranks):
                        continue
                    chunks = _chunks_for(token, bench_workers.num_stages(name, ranks))
                    row = Row(section, ranks, _size_label(numel), chunks, label, impl, vs=vs)
                    group[label] = row
                    rows_out.append(row)
                    _run_config(args, row, name, sim_name, numel, comm.get(numel), (f, b, w),
                                steps, warmup)
                    _print_progress(row)
                for row in group.values():
                    other = group.get(row.vs or "")
                    if other is not None and row.step_ms and other.step_ms:
                        row.ratio = row.step_ms / other.step_ms


def _run_config(
    args: argparse.Namespace, row: Row, name: str, sim_name: str | None, numel: int,
    comm_ms: float | None, fbw: tuple[float, float, float], steps: int, warmup: int,
) -> None:
    """Run one sleep configuration on fresh ranks and fill ``row`` (or its error)."""
    f, b, w = fbw
    ranks, chunks = row.ranks, row.chunks
    costs = _costs(f, b, w)
    try:
        ours = generate(sim_name, ranks, chunks) if sim_name is not None else None
    except Exception as exc:  # noqa: BLE001 - reported as a row
        row.error = _short_error(exc)
        return
    expected = simulate(ours, costs).makespan if ours is not None else 5 * chunks * (f + b + w)
    cfg = {
        "impl": row.runtime, "schedule": name, "chunks": chunks, "f": f, "b": b, "w": w,
        "numel": numel, "warmup": warmup, "steps": steps, "timeout": args.timeout,
        "timeline": args.timeline,
    }
    try:
        results = bench_launch.launch(bench_workers.sleep_worker, ranks, cfg,
                                      timeout=_timeout(expected, steps + warmup, ranks))
    except Exception as exc:  # noqa: BLE001 - reported as a row
        row.error = _short_error(exc)
        return
    row.step_ms, row.min_ms = _median_step(results)
    row.actions = max(r["actions"] for r in results)
    row.cpu_ms = statistics.mean(r["cpu"] for r in results) * 1000.0
    row.overshoot_ms = statistics.mean(r["overshoot_ms"] for r in results)
    schedule = ours
    if schedule is None and results[0]["order"] is not None:
        try:
            schedule = torch_schedule([r["order"] for r in results], ranks, chunks)
        except Exception as exc:  # noqa: BLE001 - note, not an error
            row.notes.append(f"torch order not simulated: {_short_error(exc)}")
    if schedule is not None:
        try:
            sim = simulate(schedule, costs)
            row.ideal_ms, row.sim_ms = max(sim.busy), sim.makespan
            if comm_ms is not None:
                row.sim_comm_ms = simulate(schedule, _costs(f, b, w, comm_ms)).makespan
            o = row.overshoot_ms
            if o > 0 and min(f, b, w) > 0:
                row.sim_slept_ms = simulate(schedule, _costs(f + o, b + o, w + o)).makespan
        except Exception as exc:  # noqa: BLE001 - note, not an error
            row.notes.append(f"not simulated: {_short_error(exc)}")
    _timeline_note(row, results)
    _check_counts(row, results)


def _timeline_note(row: Row, results: list[dict[str, Any]]) -> None:
    """With ``--timeline`` (ours only): summary of one extra recorded step: per rank, the
    time inside actions, the time blocked on receives, and the rest (between actions);
    plus the mean overshoot of the stages' sleeps during the timed steps."""
    overshoot = statistics.mean(r.get("overshoot_ms", 0.0) for r in results)
    rec = results[0].get("timeline")
    if not rec:
        return
    busy, waits = rec["busy"], rec["waits"]
    rest = [rec["makespan"] - b - w for b, w in zip(busy, waits, strict=True)]

    def fmt(xs: list[float]) -> str:
        return "[" + ", ".join(f"{x:.0f}" for x in xs) + "]"

    row.notes.append(
        f"recorded step {rec['makespan']:.0f} ms; per rank: in actions {fmt(busy)}, blocked "
        f"on receives {fmt(waits)}, rest {fmt(rest)} ms; sleeps overshoot "
        f"{overshoot:.2f} ms each (ideal {row.ideal_ms or 0:.0f} ms)"
    )


def _check_counts(row: Row, results: list[dict[str, Any]]) -> None:
    """Every micro-batch must run each stage's forward and weight branch exactly once,
    and its input branch once except on stage 0; a mismatch becomes a note."""
    for res in results:
        counts = res["counts"]
        stages = res["stages"]
        per_stage = row.chunks
        if row.label == "DualPipe":
            per_stage = row.chunks // 2  # each copy of a stage sees one stream
        fwd = per_stage * len(stages)
        inp = per_stage * sum(1 for s in stages if s != 0)
        got = (counts["forward"], counts["input"], counts["weight"])
        if got != (fwd, inp, fwd):
            row.notes.append(f"branch calls {got} != expected {(fwd, inp, fwd)}")
            return


def run_gpt(args: argparse.Namespace, rows_out: list[Row], steps: int, warmup: int,
            chunks: int, shape: bench_gpt.GPTShape) -> None:
    """Tokens per second of DualPipeV on 2 ranks: ours vs torch's ScheduleDualPipeV."""
    group: dict[str, Row] = {}
    for label, impl, name, vs in (
        ("DualPipeV", "ours", "dualpipev", "torch DualPipeV"),
        ("torch DualPipeV", "torch", "DualPipeV", None),
    ):
        if args.only and impl != args.only:
            continue
        row = Row("gpt", 2, f"{shape.mb}x{shape.seq}x{shape.dim}", chunks, label, impl, vs=vs)
        rows_out.append(row)
        group[label] = row
        cfg = {"impl": impl, "schedule": name, "chunks": chunks, "shape": shape,
               "warmup": warmup, "steps": steps, "timeout": args.timeout}
        try:
            results = bench_launch.launch(bench_workers.gpt_worker, 2, cfg, timeout=300.0)
        except Exception as exc:  # noqa: BLE001 - reported as a row
            row.error = _short_error(exc)
            _print_progress(row)
            continue
        row.step_ms, row.min_ms = _median_step(results)
        row.tokens_per_s = chunks * shape.mb * shape.seq / (row.step_ms / 1000.0)
        row.actions = max(r["actions"] for r in results)
        row.cpu_ms = statistics.mean(r["cpu"] for r in results) * 1000.0
        _print_progress(row)
    for row in group.values():
        if row.vs and row.vs in group and row.tokens_per_s and group[row.vs].tokens_per_s:
            row.ratio = row.step_ms / group[row.vs].step_ms  # type: ignore[operator]


# ----------------------------------------------------------------------------- output


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _print_progress(row: Row) -> None:
    head = f"  [{row.section}] ranks={row.ranks} {row.size} mb={row.chunks} {row.label}:"
    if row.error:
        _say(f"{head} ERROR {row.error}")
        return
    extra = ""
    if row.tokens_per_s:
        extra = f" {row.tokens_per_s:,.0f} tok/s"
    _say(
        f"{head} {row.step_ms:.1f} ms (min {row.min_ms:.1f}) ideal {_f(row.ideal_ms, '.0f')} "
        f"sim {_f(row.sim_ms, '.0f')} eff {_f(row.efficiency, '.3f')} "
        f"ovh {_f(row.overhead, '.3f')}{extra}"
        + (f"  [{'; '.join(row.notes)}]" if row.notes else "")
    )


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(wd) for h, wd in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * wd for wd in widths))
    lines += ["  ".join(c.rjust(wd) for c, wd in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def sleep_table(rows: list[Row], markdown: bool) -> str:
    """The sleep-stage table."""
    headers = ["ranks", "act", "mb", "schedule", "step ms", "min ms", "ideal ms", "sim ms",
               "sim+comm ms", "eff", "ovh", "ovh+comm", "sleep+ ms", "ovh*", "ours/torch"]
    out = []
    for r in rows:
        if r.error:
            out.append([str(r.ranks), r.size, str(r.chunks), r.label, "ERROR"]
                       + ["-"] * (len(headers) - 5))
            continue
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f} vs {r.vs}"
        out.append([
            str(r.ranks), r.size, str(r.chunks), r.label, _f(r.step_ms, ".1f"),
            _f(r.min_ms, ".1f"), _f(r.ideal_ms, ".0f"), _f(r.sim_ms, ".0f"),
            _f(r.sim_comm_ms, ".1f"), _f(r.efficiency, ".3f"), _f(r.overhead, ".3f"),
            _f(r.overhead_comm, ".3f"), _f(r.overshoot_ms, ".2f"), _f(r.overhead_slept, ".3f"),
            ratio,
        ])
    return _table(headers, out, markdown)


def zero_table(rows: list[Row], markdown: bool) -> str:
    """The zero-cost table."""
    headers = ["ranks", "mb", "schedule", "step ms", "min ms", "actions/rank", "ms/action",
               "cpu ms/action", "ours/torch"]
    out = []
    for r in rows:
        if r.error:
            out.append([str(r.ranks), str(r.chunks), r.label, "ERROR"] + ["-"] * 5)
            continue
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f} vs {r.vs}"
        out.append([str(r.ranks), str(r.chunks), r.label, _f(r.step_ms, ".2f"),
                    _f(r.min_ms, ".2f"), str(r.actions), _f(r.per_action_ms, ".3f"),
                    _f(r.cpu_per_action_ms, ".3f"), ratio])
    return _table(headers, out, markdown)


def gpt_table(rows: list[Row], markdown: bool) -> str:
    """The real-model table."""
    headers = ["ranks", "micro-batch", "mb", "schedule", "step ms", "min ms", "tokens/s",
               "ours/torch time"]
    out = []
    for r in rows:
        if r.error:
            out.append([str(r.ranks), r.size, str(r.chunks), r.label, "ERROR"] + ["-"] * 3)
            continue
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f} vs {r.vs}"
        out.append([str(r.ranks), r.size, str(r.chunks), r.label, _f(r.step_ms, ".1f"),
                    _f(r.min_ms, ".1f"), _f(r.tokens_per_s, ",.0f"), ratio])
    return _table(headers, out, markdown)


def render(rows: list[Row], header: list[str], markdown: bool) -> str:
    """Everything, as plain text or markdown."""
    parts = []
    if markdown:
        parts += header + [""]
    else:
        parts += header + [""]
    titles = {
        "sleep": "Sleep stages",
        "zero": "Zero-cost stages (runtime overhead per action)",
        "gpt": "Real compute: GPT-style model, DualPipeV on 2 ranks",
    }
    tables = {"sleep": sleep_table, "zero": zero_table, "gpt": gpt_table}
    for section in ("sleep", "zero", "gpt"):
        sel = [r for r in rows if r.section == section]
        if not sel:
            continue
        parts.append(f"### {titles[section]}" if markdown else f"== {titles[section]} ==")
        parts.append("")
        parts.append(tables[section](sel, markdown))
        notes = [f"{r.label} ranks={r.ranks} {r.size} mb={r.chunks}: {n}"
                 for r in sel for n in ([f"ERROR {r.error}"] if r.error else []) + r.notes]
        if notes:
            parts.append("")
            parts += [("- " if markdown else "  note: ") + n for n in notes]
        parts.append("")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Pipeline runtimes side by side: ours vs torch.distributed.pipelining.",
    )
    p.add_argument("--quick", action="store_true", help="small subset for a smoke run")
    p.add_argument("--ranks", default="2,4,8", help="rank counts (default 2,4,8)")
    p.add_argument("--chunks", default="2x,20",
                   help="micro-batch counts; 'Kx' means K x pipeline stages (default 2x,20)")
    p.add_argument("--f", type=float, default=10.0, help="forward ms (default 10)")
    p.add_argument("--b", type=float, default=10.0, help="input-gradient ms (default 10)")
    p.add_argument("--w", type=float, default=10.0, help="weight-gradient ms (default 10)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per config (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--sizes", default="4k,4m",
                   help="activation sizes: 4k, 4m or fp32 element counts (default 4k,4m)")
    p.add_argument("--only", choices=["ours", "torch"], help="run one runtime only")
    p.add_argument("--schedules", default="",
                   help="comma-separated row labels to keep (e.g. 'DualPipeV,torch DualPipeV')")
    p.add_argument("--parts", default="sleep,zero,gpt",
                   help="sections to run: sleep, zero, gpt (default all)")
    p.add_argument("--zero-ranks", type=int, default=4, help="ranks of the zero-cost rows")
    p.add_argument("--zero-chunks", type=int, default=20, help="micro-batches, zero-cost rows")
    p.add_argument("--zero-steps", type=int, default=40, help="timed steps, zero-cost rows")
    p.add_argument("--gpt-chunks", type=int, default=8, help="micro-batches of the GPT rows")
    p.add_argument("--gpt-steps", type=int, default=20, help="timed steps of the GPT rows")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a rank may wait for a message (default 60)")
    p.add_argument("--timeline", action="store_true",
                   help="ours: one extra recorded step per config; busy/blocked time as notes")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.schedules = set(_parse_list(args.schedules))
    parts = set(_parse_list(args.parts))
    ranks_list = [int(r) for r in _parse_list(args.ranks)]
    chunk_tokens = _parse_list(args.chunks)
    sizes = [_parse_size(s) for s in _parse_list(args.sizes)]
    steps, warmup = max(args.steps, 1), max(args.warmup, 1)  # step 1 sets torch's shapes up
    zero_steps, gpt_steps = args.zero_steps, args.gpt_steps
    shape = bench_gpt.GPTShape()
    if args.quick:
        ranks_list, chunk_tokens, sizes = [2], ["2x"], [SIZES["4k"]]
        steps, warmup, zero_steps, gpt_steps = 3, 1, 5, 3
    started = time.monotonic()
    header = [
        *run_header("bench_pipelines.py", argv),
        f"sleep stages: F={args.f:g} B={args.b:g} W={args.w:g} ms; "
        f"{steps} timed steps after {warmup} warm-up",
    ]
    header.append(
        f"at start: {_load()}; time.sleep({args.f:g} ms) overshoots by "
        f"{sleep_overshoot(args.f):.3f} ms (median)"
    )
    for line in header:
        _say(line)

    checks: list[str] = []
    try:
        checks += check_split(args.f, args.b, args.w)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        checks.append(f"ours: SPLIT CHECK FAILED: {_short_error(exc)}")
    if args.only != "ours":
        try:
            checks += check_torch_split(args.f, args.b, args.w, 120.0)
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            checks.append(f"torch: SPLIT CHECK FAILED: {_short_error(exc)}")
    for line in checks:
        _say("split check: " + line)

    comm: dict[int, float] = {}
    try:
        comm = measure_comm(sorted(set(sizes) | {16}), 120.0)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        _say(f"comm measurement failed: {_short_error(exc)}")
    comm_line = "gloo one-way message time (median of 20 ping-pongs, 2 processes): " + ", ".join(
        f"{_size_label(n)} {ms:.3f} ms" for n, ms in sorted(comm.items())
    )
    _say(comm_line)

    rows: list[Row] = []
    if "sleep" in parts:
        _say("sleep stages:")
        run_sleep(args, comm, rows, "sleep", args.f, args.b, args.w, ranks_list, sizes,
                  chunk_tokens, steps, warmup)
    if "zero" in parts:
        _say("zero-cost stages:")
        run_sleep(args, {}, rows, "zero", 0.0, 0.0, 0.0, [args.zero_ranks], [16],
                  [str(args.zero_chunks)], zero_steps, max(warmup, 2))
    if "gpt" in parts:
        _say("GPT:")
        run_gpt(args, rows, gpt_steps, warmup, args.gpt_chunks, shape)

    wall = time.monotonic() - started
    footer = [f"wall time: {wall / 60:.1f} min; at end: {_load()}"]
    header_all = header + ["split check: " + c for c in checks] + [comm_line]
    if "gpt" in parts:
        header_all.append(
            f"GPT: vocab {shape.vocab}, seq {shape.seq}, dim {shape.dim}, {shape.heads} heads, "
            f"{shape.layers} blocks over 4 stages, {shape.mb} sequences per micro-batch"
        )
    _say("")
    _say(render(rows, header_all, markdown=False))
    _say(footer[0])
    if args.markdown:
        text = render(rows, [f"- {h}" for h in header_all], markdown=True)
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + "\n- " + footer[0] + "\n")
        _say(f"markdown written to {args.markdown}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
