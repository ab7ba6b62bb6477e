"""Benchmark: the auto-scheduler against DualPipeV, ZBV and 1F1B.

Run ``python benchmarks/bench_autoschedule.py`` (``--quick`` for a smoke run). In one run:

1. *Simulated grid* (the issue's targets): for f:b:w ratios 1:1:1, 1:2:1, 2:3:1, 1:1:2
   (``b`` is the input-gradient part of a backward, as for the sleep stages: a full
   backward costs ``b + w``), comm 0, 5 % and 20 % of ``f``, pairs without gain
   (``fb = f + b + w``) and with overlap (``fb = 1.1 max(f, b + w)``), 4 and 8 ranks,
   2 x ranks and 20 micro-batches: the simulated step of DualPipeV, ZBV, 1F1B and the
   auto-schedule at DualPipeV's activation limit (PP + 1 = 2N + 1 per rank). 1F1B is the
   classic schedule on the same model and devices: each rank's two V stages merged into
   one stage of twice the cost (peak 2N stage activations). ``LB`` is a lower bound on
   any schedule (see :func:`lower_bound`): where ``LB > 0.95 x best`` no schedule can be
   5 % faster than the best baseline.
2. *Measured on sleep stages* (:mod:`bench_stages`, our runtime, same run): DualPipeV,
   ZBV and the auto-schedule (from the nominal costs, and from the costs measured in a
   recorded DualPipeV step) on identical stages, interleaved over several rounds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import bench_launch
import bench_stages
import bench_workers
import torch

from dualpipe.autoschedule import costs_from_timeline, search
from dualpipe.errors import ScheduleError
from dualpipe.schedules import Schedule, generate
from dualpipe.simulation import Costs, simulate

RATIOS = {"1:1:1": (1.0, 1.0, 1.0), "1:2:1": (1.0, 2.0, 1.0), "2:3:1": (2.0, 3.0, 1.0),
          "1:1:2": (1.0, 1.0, 2.0)}  # fmt: skip
"""f : b : w, with ``b`` the input-gradient part (a full backward is ``b + w``)."""

COMMS = (0.0, 0.05, 0.2)
"""Message latency as a fraction of ``f``."""

OVERLAPS = ("none", "10%")
"""``none``: a pair costs ``f + b + w``; ``10%``: it costs ``1.1 max(f, b + w)``."""


def grid_costs(ratio: str, comm: float, overlap: str) -> Costs:
    """The simulator costs of one grid cell."""
    f, b, w = RATIOS[ratio]
    full = b + w
    fb = f + full if overlap == "none" else 1.1 * max(f, full)
    return Costs(f=f, b=full, w=w, fb=fb, comm=comm * f)


def lower_bound(ranks: int, chunks: int, costs: Costs) -> float:
    """A lower bound on the makespan of any schedule on the V layout.

    Rank r cannot start before the first micro-batch's forward reaches it,
    ``r (f + comm)``, and then has ``2C`` forwards and ``2C`` backwards to run. At most
    ``2C - 2`` of them can be pairs: its first two forwards (F0.0, F1.0) come before any
    backward exists on the rank, and its last two backwards (of the last micro-batch)
    after its last forward. So ``LB = max_r r (f + comm) + 2C (f + b) - (2C - 2) gain``
    with ``gain = max(0, f + b - fb)``.
    """
    gain = max(0.0, costs.f + costs.b - costs.pair)
    work = 2 * chunks * (costs.f + costs.b) - max(0, 2 * chunks - 2) * gain
    return (ranks - 1) * (costs.f + costs.comm) + work


@dataclass
class Cell:
    """One grid cell: simulated makespans."""

    ranks: int
    chunks: int
    ratio: str
    comm: float
    overlap: str
    dualpipev: float | None
    zbv: float | None
    one_f_one_b: float
    auto: float
    lb: float
    seconds: float
    origin: str

    @property
    def best(self) -> float:
        """The best baseline."""
        return min(x for x in (self.dualpipev, self.zbv, self.one_f_one_b) if x is not None)

    @property
    def ratio_to_best(self) -> float:
        """auto / best baseline."""
        return self.auto / self.best

    @property
    def met(self) -> bool:
        """Never slower; with comm > 0 at least 5 % faster than every baseline."""
        bound = 0.95 if self.comm > 0 else 1.0
        return self.auto <= bound * self.best + 1e-9

    @property
    def possible(self) -> bool:
        """Whether the lower bound leaves room for the cell's target."""
        bound = 0.95 if self.comm > 0 else 1.0
        return self.lb <= bound * self.best + 1e-9


def _makespan(name: str, ranks: int, chunks: int, costs: Costs) -> float | None:
    try:
        return simulate(generate(name, ranks, chunks), costs).makespan
    except ScheduleError:
        return None


def run_grid(ranks_list: list[int], chunk_tokens: list[str], quick: bool) -> list[Cell]:
    """Simulate every cell of the grid."""
    cells = []
    ratios = list(RATIOS)[:2] if quick else list(RATIOS)
    for ranks in ranks_list:
        for token in chunk_tokens:
            chunks = 2 * ranks if token == "2x" else int(token)
            for ratio in ratios:
                for comm in COMMS:
                    for overlap in OVERLAPS:
                        costs = grid_costs(ratio, comm, overlap)
                        t0 = time.perf_counter()
                        found = search(ranks, chunks, costs)
                        seconds = time.perf_counter() - t0
                        merged = Costs(f=2 * costs.f, b=2 * costs.b, w=2 * costs.w,
                                       comm=costs.comm)  # fmt: skip
                        one = simulate(generate("1f1b", ranks, chunks), merged).makespan
                        cell = Cell(
                            ranks, chunks, ratio, comm, overlap,
                            _makespan("dualpipev", ranks, chunks, costs),
                            _makespan("zbv", ranks, chunks, costs),
                            one, found.makespan, lower_bound(ranks, chunks, costs), seconds,
                            found.origin,
                        )  # fmt: skip
                        cells.append(cell)
                        print(_grid_line(cell), flush=True)
    return cells


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


GRID_HEADER = (
    "| ranks | mb | f:b:w | comm | overlap | DualPipeV | ZBV | 1F1B | auto | auto/best | LB "
    "| target | search s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _grid_line(c: Cell) -> str:
    target = "met" if c.met else ("missed" if c.possible else "missed (LB)")
    return (
        f"| {c.ranks} | {c.chunks} | {c.ratio} | {c.comm:.0%} | {c.overlap} | "
        f"{_num(c.dualpipev)} | {_num(c.zbv)} | {_num(c.one_f_one_b)} | {_num(c.auto)} | "
        f"{c.ratio_to_best:.3f} | {_num(c.lb)} | {target} | {c.seconds:.1f} |"
    )


def grid_summary(cells: list[Cell]) -> list[str]:
    """Counts of cells meeting the targets, and why the others miss."""
    never_slower = sum(1 for c in cells if c.auto <= c.best + 1e-9)
    comm = [c for c in cells if c.comm > 0]
    met = [c for c in comm if c.met]
    impossible = [c for c in comm if not c.possible]
    zero = [c for c in cells if c.comm == 0]
    lines = [
        f"never slower than the best baseline: {never_slower} / {len(cells)} cells",
        f"comm > 0, at least 5 % faster than every baseline: {len(met)} / {len(comm)} cells;"
        f" {len(impossible)} of the others cannot be (LB > 0.95 x best)",
        f"comm = 0 (target: never slower): {sum(1 for c in zero if c.met)} / {len(zero)};"
        f" 5 % faster there too: {sum(1 for c in zero if c.auto <= 0.95 * c.best)}",
        "by overlap, comm > 0 met: "
        + ", ".join(
            f"{o}: {sum(1 for c in met if c.overlap == o)}/{sum(1 for c in comm if c.overlap == o)}"
            for o in OVERLAPS
        ),
        f"search time: max {max(c.seconds for c in cells):.1f} s,"
        f" median {statistics.median(c.seconds for c in cells):.1f} s per cell",
    ]
    return lines


# ----------------------------------------------------------------------------- measured


def sleep_worker(rank: int, ranks: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One rank: run ``cfg['schedule']`` (a ``Schedule.to_dict()``) on uniform sleep stages.

    Every stage sleeps F, B (input branch) and W ms; the pipeline input requires grad so
    stage 0 runs its input branch too and all stages cost the same, as in the simulator.
    Returns the timed steps' seconds and, with ``cfg['record']``, the costs read back from
    one recorded step (rank 0).
    """
    from dualpipe.runtime.pipeline import Pipeline

    schedule = Schedule.from_dict(cfg["schedule"])
    layout = schedule.layout
    stages = [bench_stages.SleepStage(cfg["f"], cfg["b"], cfg["w"])
              for _ in range(layout.num_stages)]  # fmt: skip
    modules = [stages[k] for k in layout.rank_stages[rank]]
    pipe = Pipeline(modules, schedule, timeout=cfg["timeout"])
    chunks = schedule.num_chunks
    x = torch.zeros(chunks, cfg["numel"], requires_grad=True)
    y = torch.zeros(chunks, 1)

    def step(record: bool = False) -> None:
        if rank == 0:
            pipe.step(x, num_chunks=chunks, criterion=bench_stages.sleep_loss, labels=(y,),
                      record=record)  # fmt: skip
        else:
            pipe.step(num_chunks=chunks, criterion=bench_stages.sleep_loss, record=record)

    runner = bench_workers._Runner(step, modules, sum(1 for _ in schedule.actions(rank)))
    times, _ = bench_workers._time_steps(runner, cfg["warmup"], cfg["steps"])
    costs = None
    if cfg.get("record"):
        step(record=True)
        timeline = pipe.gather_timeline()
        if timeline is not None:
            c = costs_from_timeline(timeline)
            costs = {"f": c.f, "b": c.b, "w": c.w, "fb": c.pair, "comm": c.comm}
    return {"times": times, "costs": costs}


@dataclass
class Measured:
    """One schedule of the measured section."""

    label: str
    schedule: Schedule
    sim_ms: float
    steps_ms: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.steps_ms) if self.steps_ms else None


def _launch(schedule: Schedule, f: float, b: float, w: float, args: argparse.Namespace,
            record: bool = False) -> dict[str, Any]:  # fmt: skip
    cfg = {"schedule": schedule.to_dict(), "f": f, "b": b, "w": w, "numel": args.numel,
           "warmup": args.warmup, "steps": args.steps, "timeout": args.timeout,
           "record": record}  # fmt: skip
    expected = simulate(schedule, Costs(f=f, b=b + w, w=w)).makespan / 1000.0
    limit = 60.0 + 4.0 * (args.warmup + args.steps + 1) * expected
    results = bench_launch.launch(sleep_worker, schedule.num_ranks, cfg, timeout=limit)
    steps = len(results[0]["times"])
    per_step = [max(r["times"][i] for r in results) * 1000.0 for i in range(steps)]
    return {"steps_ms": per_step, "costs": results[0]["costs"]}


def run_measured(args: argparse.Namespace, ranks: int, chunks: int) -> list[Measured]:
    """DualPipeV, ZBV and auto on the same sleep stages, interleaved over rounds."""
    f, b, w = args.f, args.b, args.w
    comm = bench_launch.launch(bench_workers.pingpong_worker, 2, [args.numel], 20,
                               timeout=120.0)[0][args.numel]  # fmt: skip
    nominal = Costs(f=f, b=b + w, w=w, fb=f + b + w, comm=comm)
    print(f"\nmeasured: {ranks} ranks, {chunks} micro-batches, F {f:g} / B {b:g} / W {w:g} ms,"
          f" {4 * args.numel} B activations, one-way message {comm:.3f} ms", flush=True)
    rows = []
    for name, label in (("dualpipev", "DualPipeV"), ("zbv", "ZBV")):
        try:
            s = generate(name, ranks, chunks)
        except ScheduleError as exc:
            print(f"{label}: not available ({exc})")
            continue
        rows.append(Measured(label, s, simulate(s, nominal).makespan))
    found = search(ranks, chunks, nominal)
    rows.append(Measured("auto (nominal costs)", found.schedule, found.makespan,
                         note=found.origin))  # fmt: skip
    # costs measured in a recorded DualPipeV step feed a second search
    probe = _launch(generate("dualpipev", ranks, chunks), f, b, w, args, record=True)
    c = probe["costs"]
    measured = Costs(f=c["f"], b=c["b"], w=min(c["w"], c["b"]), fb=c["fb"], comm=c["comm"])
    from_measured = search(ranks, chunks, measured)
    print(
        f"costs measured in a recorded DualPipeV step: f {c['f']:.2f}, b {c['b']:.2f},"
        f" w {c['w']:.2f}, fb {c['fb']:.2f}, comm {c['comm']:.3f} ms", flush=True,
    )
    rows.append(Measured("auto (measured costs)", from_measured.schedule,
                         simulate(from_measured.schedule, nominal).makespan,
                         note=from_measured.origin))  # fmt: skip
    for round_ in range(args.rounds):
        for row in rows:
            got = _launch(row.schedule, f, b, w, args)
            row.steps_ms.extend(got["steps_ms"])
            print(f"  round {round_ + 1}: {row.label}: median "
                  f"{statistics.median(got['steps_ms']):.1f} ms", flush=True)  # fmt: skip
    return rows


MEASURED_HEADER = (
    "| schedule | simulated ms | measured ms (median) | min ms | measured / simulated "
    "| vs DualPipeV | vs ZBV |\n|---|---|---|---|---|---|---|"
)


def measured_lines(rows: list[Measured]) -> list[str]:
    """Markdown rows of the measured section."""
    ref = {r.label: r.median for r in rows}
    out = []
    for r in rows:
        med = r.median
        if med is None:
            continue

        def vs(label: str, med: float = med) -> str:
            other = ref.get(label)
            return f"{med / other:.3f}" if other else "n/a"

        out.append(
            f"| {r.label} | {r.sim_ms:.1f} | {med:.1f} | {min(r.steps_ms):.1f} | "
            f"{med / r.sim_ms:.3f} | {vs('DualPipeV')} | {vs('ZBV')} |"
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small subset for a smoke run")
    p.add_argument("--parts", default="grid,measured", help="grid, measured or both")
    p.add_argument("--ranks", default="4,8", help="grid rank counts (default 4,8)")
    p.add_argument("--chunks", default="2x,20", help="grid micro-batches (2x = 2 x ranks)")
    p.add_argument("--measured", default="4x8,4x12",
                   help="measured configurations RANKSxCHUNKS (default 4x8,4x12)")
    p.add_argument("--f", type=float, default=10.0, help="sleep forward ms (default 10)")
    p.add_argument("--b", type=float, default=15.0, help="sleep input-gradient ms (default 15)")
    p.add_argument("--w", type=float, default=5.0, help="sleep weight-gradient ms (default 5)")
    p.add_argument("--numel", type=int, default=1024, help="fp32 elements per activation")
    p.add_argument("--steps", type=int, default=6, help="timed steps per launch (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a rank may wait")
    p.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    return p


def main() -> None:
    args = build_parser().parse_args()
    parts = set(args.parts.split(","))
    if args.quick:
        args.ranks, args.chunks, args.measured = "4", "2x", "2x4"
        args.rounds, args.steps, args.warmup = 1, 2, 1
    from bench_pipelines import _git_state, _load

    head = (
        f"- command: python benchmarks/bench_autoschedule.py {' '.join(sys.argv[1:])}\n"
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"{platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"{_git_state()}\n- at start: {_load()}"
    )
    print(head, flush=True)
    md = [head, ""]
    if "grid" in parts:
        print(GRID_HEADER)
        ranks = [int(x) for x in args.ranks.split(",")]
        cells = run_grid(ranks, args.chunks.split(","), args.quick)
        summary = grid_summary(cells)
        t0 = time.perf_counter()
        search(8, 32, grid_costs("1:1:1", 0.05, "10%"))
        summary.append(f"search time for 8 ranks x 32 micro-batches (1:1:1, comm 5 %, overlap):"
                       f" {time.perf_counter() - t0:.1f} s")  # fmt: skip
        print("\n".join(summary))
        md += ["### Simulated grid", "", GRID_HEADER, *map(_grid_line, cells), "",
               *[f"* {line}" for line in summary], ""]  # fmt: skip
    if "measured" in parts:
        for token in args.measured.split(","):
            ranks_s, chunks_s = token.split("x")
            rows = run_measured(args, int(ranks_s), int(chunks_s))
            lines = measured_lines(rows)
            print(MEASURED_HEADER)
            print("\n".join(lines))
            for r in rows:
                if r.note:
                    print(f"  {r.label}: {r.note}")
            md += [f"### Measured: {token} (ranks x micro-batches), sleep stages "
                   f"F {args.f:g} / B {args.b:g} / W {args.w:g} ms", "", MEASURED_HEADER,
                   *lines, ""]  # fmt: skip
    md.append(f"- at the end: {_load()}")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write("\n".join(md) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    import bench_autoschedule  # so forked ranks import the worker by module name

    bench_autoschedule.main()
