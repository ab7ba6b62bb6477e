"""Command line: ``dualpipe`` / ``python -m dualpipe``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from .errors import ScheduleError, UsageError
from .pairing import pair_steps
from .partcosts import PartCosts, interleave, parse_parts
from .schedules import io as schedule_io
from .schedules.registry import SCHEDULES, generate
from .schedules.schedule import Schedule
from .simulation import DEFAULT_W_MEMORY, Costs, SimResult, seed_bubble, simulate

__all__ = ["main", "build_parser"]

PROG = "dualpipe"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, ``dualpipe: error: ...``, exit 2."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix(PROG).strip()
        where = f" (see '{PROG} {sub + ' ' if sub else ''}--help')"
        raise UsageError(message + where)


def _add_costs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("costs (time per action, any unit; ms in practice)")
    g.add_argument("--f", type=float, default=1.0, help="forward of one stage (default 1)")
    g.add_argument("--b", type=float, default=2.0, help="full backward (default 2)")
    g.add_argument("--w", type=float, default=1.0, help="weight-gradient part of B (default 1)")
    g.add_argument("--fb", type=float, default=None, help="overlapped F&B pair (default f + b)")
    g.add_argument("--comm", type=float, default=0.0, help="latency between ranks (default 0)")
    g.add_argument(
        "--w-memory", metavar="D", default=None,
        help="memory, not time: what one deferred weight gradient holds, as a fraction of one"
        f" stage's activations; one number or one per stage, comma separated (default"
        f" {DEFAULT_W_MEMORY:g}; measure it with dualpipe.autograd.deferred_fraction)",
    )
    _add_parts(g, required=False)


def _add_parts(g: Any, required: bool) -> None:
    extra = "" if required else "; with all three, f, b, w and the pairs derive from the parts"
    g.add_argument("--part-f", metavar="LIST", required=required,
                   help="a parted stage's forward: compute,comm,compute,...,compute" + extra)
    g.add_argument("--part-b", metavar="LIST", required=required,
                   help="its input backward per part, in forward order: compute,comm,...")
    g.add_argument("--part-w", metavar="LIST", required=required,
                   help="its weight-gradient time per computation part")


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help=f"schedule: {', '.join(SCHEDULES)}")
    p.add_argument("--ranks", type=int, required=True, help="pipeline ranks")
    p.add_argument("--chunks", type=int, required=True, help="micro-batches per step, in all")
    p.add_argument("--pairs", action="store_true",
                   help="also pair two forwards (warm-up) or two backwards (cool-down) of a"
                   " rank wherever the simulated step with the part costs (--part-f/-b/-w;"
                   " default: three equal parts, two equal communications) gets faster")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of :func:`main` (``demo`` is forwarded before parsing)."""
    parser = _Parser(prog=PROG, description="DualPipe / DualPipeV schedules and tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("schedule", help="print or draw a schedule")
    _add_shape(p)
    p.add_argument(
        "--format",
        choices=("text", "png", "trace", "json", "torch"),
        default="text",
        help="text (default): 'rank R: TOKEN ...' lines; png / trace (Chrome, Perfetto) of the"
        " simulated timeline, need -o; json: Schedule.to_json(); torch: PyTorch's schedule CSV"
        " (one row per rank, e.g. 0F7, (0F7;7B3)OVERLAP_F_B)",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    _add_costs(p)

    p = sub.add_parser("simulate", help="simulate a schedule under a cost model")
    _add_shape(p)
    _add_costs(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("compare", help="the seed's comparison table, measured by simulation")
    p.add_argument("--stages", type=int, required=True, help="pipeline stages PP (even)")
    p.add_argument(
        "--chunks",
        type=int,
        required=True,
        help="micro-batches (methods that cannot take them are left out)",
    )
    _add_costs(p)

    p = sub.add_parser(
        "validate", help="check a schedule file (JSON, text or PyTorch CSV) for soundness"
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="Schedule.to_json() output, 'rank R: ...' text, or PyTorch's schedule CSV (*.csv)",
    )
    p.add_argument("--layout", metavar="NAME", help="layout of a text schedule (e.g. dualpipe)")
    p.add_argument("--ranks", type=int, help="ranks of a text schedule (default: its lines)")

    p = sub.add_parser(
        "autoschedule", help="search the fastest schedule for these costs and memory limit"
    )
    p.add_argument("--ranks", type=int, required=True, help="pipeline ranks")
    p.add_argument("--chunks", type=int, required=True, help="micro-batches per step, in all")
    _add_costs(p)
    p.add_argument(
        "--limit", type=float,
        help="memory per rank, in stage activations, deferred weight-gradient state included"
        " (see --w-memory; default: stages + 1)",
    )
    p.add_argument(
        "--max-deferred", type=int, help="deferred weight gradients per rank (default: any)"
    )
    p.add_argument(
        "--layout", choices=("v", "dualpipe"), default="v", help="stage placement (default v)"
    )
    p.add_argument("-o", "--output", metavar="FILE", help="also write the schedule as JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("pair", help="one pair of a parted stage, parts interleaved")
    _add_parts(p.add_argument_group("part costs"), required=True)
    p.add_argument("--kind", choices=["FB", "FF", "BB", "II"], default="FB",
                   help="F&B (default), two forwards, two full backwards, two input-only")
    p.add_argument("--input-only", action="store_true",
                   help="the backward is input-only (its weight work is left to W)")
    p.add_argument("-o", "--output", metavar="FILE", help="draw a PNG to FILE")

    sub.add_parser(
        "demo",
        help="train a small model with the pipeline (arguments go to dualpipe.demo)",
        add_help=False,
    )
    return parser


def _parts(args: argparse.Namespace) -> PartCosts | None:
    given = [args.part_f, args.part_b, args.part_w]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise UsageError("give --part-f, --part-b and --part-w together")
    return parse_parts(args.part_f, args.part_b, args.part_w)


def _w_memory(text: str | None) -> float | tuple[float, ...]:
    if text is None:
        return DEFAULT_W_MEMORY
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(
            f"--w-memory: expected numbers separated by commas, got {text!r}"
        ) from None
    if any(not x >= 0 for x in values):
        raise UsageError(f"--w-memory: fractions must be >= 0, got {text!r}")
    return values[0] if len(values) == 1 else values


def _costs(args: argparse.Namespace) -> Costs:
    parts = _parts(args)
    w_memory = _w_memory(args.w_memory)
    if parts is not None:
        return Costs(comm=args.comm, parts=parts, fb=args.fb, w_memory=w_memory)
    return Costs(f=args.f, b=args.b, w=args.w, fb=args.fb, comm=args.comm, w_memory=w_memory)


def _schedule(args: argparse.Namespace) -> Schedule:
    schedule = generate(args.name, args.ranks, args.chunks)
    if getattr(args, "pairs", False):
        schedule = pair_steps(schedule, _parts(args), comm=args.comm)
    return schedule


def _num(x: float) -> str:
    r = round(x, 6)
    return f"{r:.0f}" if r == int(r) else f"{r:.6g}"


def _write(path: str, text: str) -> None:
    Path(path).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def _cmd_schedule(args: argparse.Namespace) -> int:
    if args.format in ("png", "trace") and not args.output:
        raise UsageError(f"--format {args.format} needs -o FILE")
    schedule = _schedule(args)
    costs = _costs(args)
    if args.format in schedule_io.FORMATS:
        text = schedule_io.dumps(schedule, args.format)
    else:
        result = simulate(schedule, costs)
        if args.format == "png":
            from .viz.png import render_png

            render_png(result.timeline, schedule, args.output)
        else:
            from .viz.trace import write_trace

            write_trace(result.timeline, schedule, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    if args.output:
        _write(args.output, text)
    else:
        print(text)
    return 0


def _sim_summary(result: SimResult) -> dict[str, Any]:
    schedule = result.schedule
    layout = schedule.layout
    c = result.costs
    data = dict(result.to_dict())
    data.update(
        num_stages=layout.num_stages,
        params_per_device=max(len(s) for s in layout.rank_stages),
        seed_bubble=seed_bubble(schedule.name, layout.num_stages, c),
        max_bubble=max(result.bubble, default=0.0),
        costs={"f": c.f, "b": c.b, "w": c.w, "fb": c.pair, "comm": c.comm,
               "w_memory": data["w_memory"]},
    )
    return data


def _w_text(w_memory: Any) -> str:
    if isinstance(w_memory, list):
        return ",".join(_num(x) for x in w_memory)
    return _num(w_memory)


def _cmd_simulate(args: argparse.Namespace) -> int:
    schedule = _schedule(args)
    result = simulate(schedule, _costs(args))
    data = _sim_summary(result)
    if args.json:
        print(json.dumps(data))
        return 0
    c = data["costs"]
    print(
        f"{schedule.name}: {schedule.num_ranks} ranks, {data['num_stages']} stages,"
        f" {schedule.num_chunks} micro-batches; F = {_num(c['f'])}, B = {_num(c['b'])},"
        f" W = {_num(c['w'])}, F&B = {_num(c['fb'])}, comm = {_num(c['comm'])}"
    )
    print()
    print(
        f"{'rank':>4}  {'busy':>10}  {'bubble':>10}  {'peak activations':>16}"
        f"  {'peak memory':>11}"
    )
    for r in range(schedule.num_ranks):
        print(
            f"{r:>4}  {_num(result.busy[r]):>10}  {_num(result.bubble[r]):>10}"
            f"  {result.peak_activations[r]:>16}  {_num(result.peak_memory[r]):>11}"
        )
    print()
    print(f"makespan            {_num(result.makespan)}")
    print(f"bubble              max {_num(data['max_bubble'])}, total {_num(sum(result.bubble))}")
    seed = data["seed_bubble"]
    print(f"seed formula bubble {'n/a' if seed is None else _num(seed)}")
    print(f"peak activations    max {max(result.peak_activations, default=0)}")
    print(
        f"peak memory         max {_num(max(result.peak_memory, default=0.0))} (activations"
        f" + deferred weight-gradient state, {_w_text(c['w_memory'])} per deferred W)"
    )
    print(f"params per device   {data['params_per_device']}x one stage")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .viz.table import compare_table, format_compare_table

    print(format_compare_table(compare_table(args.stages, args.chunks, _costs(args))))
    return 0


def _load_schedule(args: argparse.Namespace) -> Schedule:
    return schedule_io.load(args.file, args.layout, args.ranks)


def _cmd_validate(args: argparse.Namespace) -> int:
    schedule = _load_schedule(args)
    from .schedules.validate import validate

    try:
        validate(schedule)
    except ScheduleError as exc:
        print(f"unsound: {exc}")
        return 1
    print("ok")
    return 0


def _cmd_autoschedule(args: argparse.Namespace) -> int:
    from .autoschedule import search

    found = search(
        args.ranks,
        args.chunks,
        _costs(args),
        limit=args.limit,
        layout=args.layout,
        max_deferred=args.max_deferred,
    )
    if args.output:
        _write(args.output, found.schedule.to_json())
    summary = {
        "makespan": found.makespan,
        "peak_activations": found.peak,
        "peak_memory": found.memory,
        "w_memory": _w_json(found.w_memory),
        "limit": found.limit,
        "deferred_weights": found.deferred,
        "seeds": found.seeds,
        "origin": found.origin,
        "seconds": found.seconds,
    }
    if args.json:
        print(json.dumps({**summary, "schedule": found.schedule.to_dict()}))
        return 0
    print(found.schedule.to_text())
    print()
    seeds = ", ".join(
        f"{name} {'n/a' if v is None else _num(v)}" for name, v in found.seeds.items()
    )
    print(f"makespan {_num(found.makespan)} (seeds: {seeds})")
    print(
        f"peak memory {_num(found.memory)} per rank (limit {_num(found.limit)}): {found.peak}"
        f" activations at most, deferred weight gradients at {_w_text(_w_json(found.w_memory))}"
        " each"
    )
    print(f"deferred weight gradients at most {found.deferred} per rank")
    print(f"from: {found.origin} ({found.candidates} candidates, {found.seconds:.2f} s)")
    return 0


def _w_json(w_memory: float | tuple[float, ...]) -> float | list[float]:
    return list(w_memory) if isinstance(w_memory, tuple) else w_memory


def _cmd_demo(argv: list[str]) -> int:
    try:
        from .demo import main as demo_main
    except ImportError as exc:
        print(f"{PROG}: error: the demo cannot start: {exc}", file=sys.stderr)
        return 1
    return int(demo_main(argv) or 0)


def _cmd_pair(args: argparse.Namespace) -> int:
    from .viz.pair import render_pair_png, render_pair_text

    parts = _parts(args)
    assert parts is not None
    back = "I" if args.input_only else "B"
    chains = {"FB": (back, "F"), "FF": ("F", "F"), "BB": ("B", "B"), "II": ("I", "I")}[args.kind]
    intervals = interleave(parts, chains)
    pair = max((iv.end for iv in intervals), default=0.0)
    alone = {"F": parts.forward, "B": parts.backward, "I": parts.backward - parts.weight}
    apart = sum(alone[c] for c in chains)
    print(render_pair_text(intervals))
    comm = sum(iv.end - iv.start for iv in intervals if iv.resource == "comm")
    what = " then ".join(chains[::-1] if args.kind == "FB" else chains)  # issue order
    print(f"pair {_num(pair)} vs {what} {_num(apart)}; "
          f"communication {_num(comm)}, hidden {_num(apart - pair)}")
    if args.output:
        title = {"FB": "one F&B pair", "FF": "two forwards", "BB": "two backwards",
                 "II": "two input-only backwards"}[args.kind]
        render_pair_png(intervals, args.output, title=f"{title}, parts interleaved")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


_COMMANDS = {
    "pair": _cmd_pair,
    "schedule": _cmd_schedule,
    "simulate": _cmd_simulate,
    "compare": _cmd_compare,
    "validate": _cmd_validate,
    "autoschedule": _cmd_autoschedule,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return _cmd_demo(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, ScheduleError, ValueError) as exc:
        message = " ".join(str(exc).split("\n")[0].split())
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except ImportError as exc:  # matplotlib missing for --format png
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
