"""What the demo leaves behind: the summary numbers, the loss curve, and the measured
timeline of a recorded step (PNG and Chrome/Perfetto trace).

Everything here runs in the parent process after training, from the reporting
rank's :class:`~dualpipe.demo.train.RankResult`.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runtime.timeline import MeasuredTimeline, measured_costs
from ..schedules.actions import Op, Overlap, step_actions
from ..simulation import Costs, simulate
from .model import GPTConfig
from .task import CopyTask
from .train import GRAD_ATOL, GRAD_RTOL, DemoOptions, RankResult

__all__ = [
    "OUTPUT_FILES",
    "idle_ms",
    "summarize",
    "format_summary",
    "plot_loss",
    "write_figures",
    "write_summary",
]

OUTPUT_FILES = ("loss.png", "timeline.png", "timeline.json", "summary.json")
"""Files written into the output folder."""


def idle_ms(timeline: MeasuredTimeline) -> list[float]:
    """Per rank, the step's idle time (:attr:`MeasuredTimeline.idle`)."""
    return timeline.idle


def _costs(timeline: MeasuredTimeline, costs: Costs) -> dict[str, float]:
    """The simulator costs that matter for the schedule: F, B, plus W where it splits
    backwards and F&B where it overlaps pairs."""
    steps = [step for row in timeline.schedule.steps for step in row]
    out = {"f": costs.f, "b": costs.b}
    if any(a.op is Op.WEIGHT for step in steps for a in step_actions(step)):
        out["w"] = costs.w
    if any(isinstance(step, Overlap) for step in steps):
        out["fb"] = costs.pair
    return out


def _timeline_numbers(timeline: MeasuredTimeline) -> dict[str, Any]:
    """Measured step, bubble and the simulated step under the measured costs (ms)."""
    makespan = timeline.makespan
    bubble = idle_ms(timeline)
    costs = measured_costs(timeline)
    sim = simulate(timeline.schedule, costs)
    mean_bubble = statistics.fmean(bubble)
    max_bubble = max(bubble)
    waits = [sum(w.end - w.start for w in row) for row in timeline.waits]
    return {
        "measured_step_ms": makespan,
        "simulated_step_ms": sim.makespan,
        "costs_ms": _costs(timeline, costs),
        "bubble_ms": {
            "per_rank": bubble,
            "mean": mean_bubble,
            "max": max_bubble,
            "mean_pct": 100.0 * mean_bubble / makespan if makespan else 0.0,
            "max_pct": 100.0 * max_bubble / makespan if makespan else 0.0,
        },
        "recv_wait_ms": waits,
        "simulated_bubble_ms": {
            "per_rank": sim.bubble,
            "mean": statistics.fmean(sim.bubble),
            "max": max(sim.bubble),
        },
    }


def summarize(
    opts: DemoOptions,
    ranks: int,
    stages: int,
    config: GPTConfig,
    task: CopyTask,
    result: RankResult,
    wall_s: float,
) -> dict[str, Any]:
    """The numbers of a run as a JSON-ready dict (times in ms, losses per step)."""
    steady = result.step_ms[1:] or result.step_ms  # step 1 includes warm-up
    steady_iter = result.iter_ms[1:] or result.iter_ms
    summary: dict[str, Any] = {
        "schedule": opts.schedule,
        "ranks": ranks,
        "stages": stages,
        "chunks": opts.chunks,
        "micro_batch": opts.micro_batch,
        "batch": opts.chunks * opts.micro_batch,
        "steps": opts.steps,
        "lr": opts.lr,
        "seed": opts.seed,
        "cpu_cores": os.cpu_count(),
        "model": {**asdict(config), "params": result.num_params},
        "task": {
            "name": "copy",
            "vocab_size": task.vocab_size,
            "prefix_len": task.prefix_len,
            "chance_loss": task.chance_loss,
        },
        "loss": {
            "first": result.losses[0] if result.losses else None,
            "last": result.losses[-1] if result.losses else None,
            "per_step": result.losses,
        },
        "step_ms": {
            "median": statistics.median(steady) if steady else None,
            "median_with_optimizer": statistics.median(steady_iter) if steady_iter else None,
            "per_step": result.step_ms,
        },
        "grad_check": None,
        "recorded_step": result.recorded_step,
        "wall_s": wall_s,
    }
    if result.grad_check is not None:
        summary["grad_check"] = {
            "ok": result.grad_check.ok,
            "max_abs_diff": result.grad_check.max_abs_diff,
            "losses_equal": result.grad_check.losses_equal,
            "rtol": GRAD_RTOL,
            "atol": GRAD_ATOL,
            "messages": result.grad_check.messages,
        }
    if result.timeline is not None:
        summary.update(_timeline_numbers(result.timeline))
    return summary


def format_summary(summary: dict[str, Any]) -> list[str]:
    """The lines printed at the end of a run."""
    lines = []
    loss = summary["loss"]
    if loss["first"] is not None:
        lines.append(
            f"loss: {loss['first']:.3f} (step 1) -> {loss['last']:.4f} (step {summary['steps']})"
            f"; guessing scores {summary['task']['chance_loss']:.3f}"
        )
    step = summary["step_ms"]
    if step["median"] is not None:
        lines.append(
            f"step time: median {step['median']:.1f} ms per pipeline step "
            f"({step['median_with_optimizer']:.1f} ms with the optimizer)"
        )
    if "simulated_step_ms" in summary:
        names = {"f": "F", "b": "B", "w": "W", "fb": "F&B"}
        costs = ", ".join(f"{names[k]} {v:.2f}" for k, v in summary["costs_ms"].items())
        lines.append(
            f"simulated step time: {summary['simulated_step_ms']:.1f} ms ({summary['schedule']} "
            f"with the measured median action times {costs} ms; messages cost nothing there)"
            f" vs {summary['measured_step_ms']:.1f} ms measured in recorded step "
            f"{summary['recorded_step'] + 1}"
        )
        b = summary["bubble_ms"]
        sb = summary["simulated_bubble_ms"]
        sim_step = summary["simulated_step_ms"]
        sim_pct = 100.0 * sb["mean"] / sim_step if sim_step else 0.0
        lines.append(
            f"bubble in that step (idle or waiting to receive, per rank): mean {b['mean']:.1f} ms"
            f" = {b['mean_pct']:.1f}% of the step, max {b['max']:.1f} ms = {b['max_pct']:.1f}%"
            f"; simulated mean {sb['mean']:.1f} ms = {sim_pct:.1f}%"
        )
    if summary["grad_check"] is not None:
        g = summary["grad_check"]
        verdict = "OK" if g["ok"] else "FAILED"
        lines.append(
            f"gradient check vs single process: {verdict} (max abs diff {g['max_abs_diff']:.2e}"
            f", losses {'bit-equal' if g['losses_equal'] else 'differ'})"
        )
    return lines


def plot_loss(summary: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw the per-step training loss (log scale) with the guessing level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    losses = summary["loss"]["per_step"]
    steps = range(1, len(losses) + 1)
    fig = Figure(figsize=(7.0, 3.8), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#3B6FB6", linewidth=1.4, label="training loss")
    chance = summary["task"]["chance_loss"]
    ax.axhline(chance, color="#999999", linestyle="--", linewidth=1.0,
               label=f"guessing a symbol (ln {summary['task']['vocab_size'] - 2})")
    low = min(losses, default=chance)
    if low > 0 and max(max(losses, default=chance), chance) / low > 20:
        ax.set_yscale("log")  # the loss falls by orders of magnitude: show them all
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(1, max(2, len(losses)))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (copied tokens)")
    ax.grid(color="#E4E4E4", linewidth=0.6, which="both")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="best")
    model = summary["model"]
    ax.set_title(
        f"{summary['schedule']} on {summary['ranks']} ranks: {model['n_layer']}-block GPT "
        f"({model['params'] / 1e6:.2f}M params), copy task, batch {summary['batch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def write_figures(
    out: Path, summary: dict[str, Any], timeline: MeasuredTimeline | None
) -> list[Path]:
    """Write ``loss.png`` and, with a timeline, ``timeline.png`` (waits included) and
    ``timeline.json`` (Chrome/Perfetto trace) into ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss.png"]
    plot_loss(summary, written[0])
    if timeline is not None:
        title = (
            f"{timeline.schedule.name}: measured step {summary['recorded_step'] + 1} on "
            f"{timeline.schedule.num_ranks} ranks, {timeline.schedule.num_chunks} micro-batches "
            f"({timeline.makespan:.0f} ms; simulated {summary['simulated_step_ms']:.0f} ms)"
        )
        png = out / "timeline.png"
        timeline.save_png(png, title=title)
        trace = out / "timeline.json"
        timeline.save_trace(trace)
        written += [png, trace]
    return written


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Write ``summary`` as ``out/summary.json``."""
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path
