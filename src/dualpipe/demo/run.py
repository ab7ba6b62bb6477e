"""``python -m dualpipe demo``: train a small GPT with a pipeline on local CPU processes."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

from ..errors import DistributedRunError, ScheduleError, UsageError
from ..schedules.generators import SCHEDULES, generate
from ..schedules.registry import layout_for
from ..testing import run_distributed
from .model import build_gpt
from .report import format_summary, summarize, write_figures, write_summary
from .task import CopyTask
from .train import DemoOptions, default_chunks, model_config, train_rank

__all__ = ["main", "build_parser"]

PROG = "dualpipe demo"
DEFAULT_STEPS = 300
MAX_RANKS = 32


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser (errors raise :class:`UsageError`)."""
    p = _Parser(
        prog=PROG,
        description="Train a small GPT on a synthetic copy task with a pipeline schedule on "
        "local CPU processes (gloo), check the first step's gradients against one process, "
        "and write the loss curve and the measured timeline of a step.",
    )
    p.add_argument("--model", default="gpt", choices=["gpt", "moe", "hf-moe"],
                   help="gpt (default); moe: FFNs of experts sharded over an expert-parallel "
                   "group, 2 pipeline x 2 expert ranks, DualPipeV with the overlap engine; "
                   "hf-moe: the same with a tiny random HuggingFace Qwen3-MoE "
                   "(dualpipe.models.hf_ep; needs transformers), checked against HF's own "
                   "loss and timed with and without the overlap engine")
    p.add_argument("--schedule", default="dualpipev", choices=list(SCHEDULES),
                   help="pipeline schedule (default: dualpipev)")
    p.add_argument("--ranks", type=int, default=4, help="processes (default: 4)")
    p.add_argument("--chunks", type=int, default=None,
                   help="micro-batches per step (default: 2 x ranks)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per micro-batch (default: 8)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"training steps (default: {DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: 0)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the whole run is stopped (default: 120 + 2 per step)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _options(args: argparse.Namespace) -> DemoOptions:
    """Validate ``args`` (raising :class:`UsageError`) and build the run's options."""
    if not 1 <= args.ranks <= MAX_RANKS:
        raise UsageError(f"--ranks must be between 1 and {MAX_RANKS}, got {args.ranks}")
    try:
        layout_for(args.schedule, args.ranks)  # the registry's rank constraints
    except ScheduleError as exc:
        raise UsageError(str(exc)) from None
    chunks = args.chunks if args.chunks is not None else default_chunks(args.schedule, args.ranks)
    try:
        generate(args.schedule, args.ranks, chunks)
    except ScheduleError as exc:
        raise UsageError(f"--chunks {chunks}: {exc}") from None
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.micro_batch < 1:
        raise UsageError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a positive number, got {args.timeout}")
    return DemoOptions(
        schedule=args.schedule,
        chunks=chunks,
        steps=args.steps,
        micro_batch=args.micro_batch,
        seed=args.seed,
        lr=args.lr,
        progress=not args.no_progress,
    )


def _moe(args: argparse.Namespace, out: Path) -> int:
    """The MoE runs (``--model moe`` and ``hf-moe``): 4 processes (2 pipeline x 2
    expert-parallel), DualPipeV."""
    from .moe_run import run_hf_moe, run_moe
    from .moe_train import MoEOptions

    if args.schedule != "dualpipev" or args.ranks != 4:
        print(f"{PROG}: error: --model {args.model} runs dualpipev on 4 processes (2 pipeline "
              "x 2 expert-parallel ranks)", file=sys.stderr)
        return 2
    hf = args.model == "hf-moe"
    needs = ["matplotlib"] + (["transformers"] if hf else [])
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        extras = "demo,hf" if hf else "demo"
        print(f"{PROG}: error: --model {args.model} needs {' and '.join(missing)}: "
              f"pip install 'dualpipe[{extras}]'", file=sys.stderr)
        return 1
    steps = args.steps if args.steps != DEFAULT_STEPS else 60
    opts = MoEOptions(chunks=args.chunks or 8, steps=steps, micro_batch=args.micro_batch,
                      seed=args.seed, lr=args.lr)
    return (run_hf_moe if hf else run_moe)(opts, args.ranks, out, args.timeout)


def _prepare_out(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create it ({exc.strerror})") from None
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the demo with ``argv`` (default ``sys.argv[1:]``); return the exit status:
    0 done, 1 the run or the gradient check failed, 2 bad options."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        opts = _options(args)
        out = _prepare_out(args.out)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    except UsageError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.model in ("moe", "hf-moe"):
        return _moe(args, out)
    missing = [m for m in ("matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{PROG}: error: the demo needs {' and '.join(missing)}: "
              "pip install 'dualpipe[demo]'", file=sys.stderr)
        return 1
    return _run(opts, args.ranks, out, args.timeout, started)


def _run(opts: DemoOptions, ranks: int, out: Path, timeout: float | None,
         started: float) -> int:
    """Train on ``ranks`` spawned processes, then write and print the results."""
    layout = layout_for(opts.schedule, ranks)
    config = model_config(layout.num_stages)
    task = CopyTask(vocab_size=config.vocab_size)
    params = sum(p.numel() for p in build_gpt(config, opts.seed).parameters())
    print(
        f"{PROG}: {config.n_layer}-block GPT ({params / 1e6:.2f}M params) learning to copy "
        f"{task.prefix_len} symbols; {opts.schedule} on {ranks} ranks ({layout.num_stages} "
        f"stages), {opts.chunks} micro-batches x {opts.micro_batch} sequences, "
        f"{opts.steps} steps",
        flush=True,
    )
    cores = os.cpu_count() or 1
    if ranks > cores:
        print(f"note: {ranks} ranks share {cores} CPU cores, so measured times include "
              "time-sharing between ranks", flush=True)
    limit = timeout if timeout is not None else 120.0 + 2.0 * opts.steps
    try:
        results = run_distributed(train_rank, ranks, opts, timeout=limit)
    except DistributedRunError as exc:
        print(f"{PROG}: error: training failed:\n{exc}", file=sys.stderr)
        return 1
    result = next(r for r in results if r.reporter)
    summary = summarize(opts, ranks, layout.num_stages, config, task, result, 0.0)
    try:
        written = write_figures(out, summary, result.timeline)
        summary["wall_s"] = time.perf_counter() - started
        written.append(write_summary(out, summary))
    except OSError as exc:
        print(f"{PROG}: error: cannot write the outputs: {exc}", file=sys.stderr)
        return 1
    for line in format_summary(summary):
        print(line)
    print(f"wrote {', '.join(str(p) for p in written)}")
    print(f"wall time: {summary['wall_s']:.1f} s")
    check = summary["grad_check"]
    return 0 if check is not None and check["ok"] else 1
