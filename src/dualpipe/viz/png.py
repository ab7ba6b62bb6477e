"""PNG rendering of a timeline, in the spirit of the DualPipe paper's figure."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..schedules.actions import Op
from ..schedules.schedule import Schedule
from ..simulation import TimedStep
from ._common import KIND_NAMES, all_segments, direction_names, time_span

if TYPE_CHECKING:
    from ._common import TimedWait

__all__ = ["render_png", "COLORS"]

COLORS: dict[Op, tuple[str, str]] = {
    Op.FORWARD: ("#FFD27A", "#F0963C"),
    Op.BACKWARD: ("#A6DB8F", "#4FA85E"),
    Op.INPUT: ("#A9D4F2", "#4A8FD0"),
    Op.WEIGHT: ("#D5C3EE", "#9A77CF"),
}
"""Box colours per kind: (first direction, second direction)."""

_WAIT_COLOR = "#9A9A9A"
_EDGE = "#3A3A3A"
_BOX_H = 0.78
_FONT = 7.0
_UNIT_PT = 21.0  # points given to the typical single action's duration


def _label_fits(width_pt: float, label: str, fontsize: float) -> bool:
    return width_pt >= len(label) * fontsize * 0.62 + 2.0


def render_png(
    timeline: Sequence[Sequence[TimedStep]],
    schedule: Schedule,
    path: str | os.PathLike[str],
    title: str | None = None,
    waits: Sequence[Sequence[TimedWait]] | None = None,
    *,
    time_unit: str | None = None,
    dpi: int = 130,
    memory: Sequence[Sequence[tuple[float, float]]] | None = None,
) -> None:
    """Draw ``timeline`` to a PNG file at ``path``.

    Args:
        timeline: per rank, the timed steps (simulated or measured).
        schedule: the schedule the timeline runs (layout gives directions).
        path: output file.
        title: figure title; defaults to the schedule's name, ranks and micro-batches.
        waits: optional per-rank waits, drawn as thin grey bars.
        time_unit: unit of the times for the axis label (e.g. ``"ms"``).
        dpi: resolution.
        memory: optional per-rank ``(time, bytes)`` samples (a measured step's memory
            held after every action): drawn as one memory row per rank in a panel
            under the timeline, each rank's peak written at its right end.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch, Rectangle
    except ImportError:
        raise ImportError(
            "render_png needs matplotlib; install it with: pip install 'dualpipe[viz]'"
        ) from None

    segs = list(all_segments(timeline, schedule))
    rows = max(len(timeline), schedule.num_ranks, 1)
    t0, t1 = time_span(timeline, waits)
    span = t1 - t0 if t1 > t0 else 1.0
    single = [s.end - s.start for s in segs if s.pair is None and s.end > s.start]
    halves = [s.end - s.start for s in segs if s.pair is not None and s.end > s.start]
    typical = statistics.median(single or halves or [span / 20])

    names = direction_names(schedule)
    kinds_seen = {(s.action.op, min(s.direction, 1)) for s in segs}
    has_pairs = any(s.half == 1 for s in segs)
    has_waits = waits is not None and any(waits)
    n_entries = len(kinds_seen) + has_pairs + has_waits

    # Size: the typical single action gets about _UNIT_PT points, within limits.
    left_in, right_in = 0.95, 0.3
    plot_w_in = min(42.0, max(6.0, span / typical * _UNIT_PT / 72.0))
    fig_w_in = plot_w_in + left_in + right_in
    ncol = max(1, min(n_entries, int(fig_w_in * 72 / 185)))
    legend_rows = -(-n_entries // ncol) if n_entries else 0
    top_in, axis_in, legend_in = 0.5, 0.48, 0.12 + 0.2 * legend_rows
    plot_h_in = 0.36 * rows + 0.2
    has_memory = memory is not None and any(memory)
    mem_h_in = plot_h_in + 0.25 if has_memory else 0.0
    fig_h_in = plot_h_in + top_in + legend_in + axis_in + mem_h_in
    pt_per_unit = plot_w_in * 72.0 / span

    fig = Figure(figsize=(fig_w_in, fig_h_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes(
        (
            left_in / fig_w_in,
            (legend_in + axis_in + mem_h_in) / fig_h_in,
            plot_w_in / fig_w_in,
            plot_h_in / fig_h_in,
        )
    )
    if has_memory:
        assert memory is not None
        mem_ax = fig.add_axes(
            (
                left_in / fig_w_in,
                (legend_in + axis_in) / fig_h_in,
                plot_w_in / fig_w_in,
                (mem_h_in - 0.25) / fig_h_in,
            )
        )
        _draw_memory(mem_ax, memory, rows, t0, span)

    if waits is not None:
        for row, row_waits in enumerate(waits):
            for w in row_waits:
                ax.add_patch(
                    Rectangle(
                        (w.start, row - 0.09),
                        w.end - w.start,
                        0.18,
                        facecolor=_WAIT_COLOR,
                        edgecolor="none",
                        zorder=1,
                    )
                )

    for seg in segs:
        color = COLORS[seg.action.op][min(seg.direction, 1)]
        width = seg.end - seg.start
        y = seg.row - _BOX_H / 2
        ax.add_patch(
            Rectangle(
                (seg.start, y),
                width,
                _BOX_H,
                facecolor=color,
                edgecolor=_EDGE,
                linewidth=0.5,
                zorder=2,
            )
        )
        label = str(seg.action.chunk)
        if _label_fits(width * pt_per_unit, label, _FONT):
            ax.text(
                seg.start + width / 2,
                seg.row,
                label,
                ha="center",
                va="center",
                fontsize=_FONT,
                color="#111111",
                zorder=4,
            )
    pairs = [s for s in segs if s.half == 1]
    for seg in pairs:
        timed_end = 2 * seg.end - seg.start  # halves are equal: the pair ends here
        ax.add_patch(
            Rectangle(
                (seg.start, seg.row - _BOX_H / 2),
                timed_end - seg.start,
                _BOX_H,
                facecolor="none",
                edgecolor="black",
                linewidth=1.9,
                zorder=3,
            )
        )

    ax.set_xlim(t0, t0 + span)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([f"rank {r}" for r in range(rows)], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=8)
    label_ax = mem_ax if has_memory else ax
    label_ax.set_xlabel(f"time ({time_unit})" if time_unit else "time", fontsize=9)
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)

    if title is None:
        title = f"{schedule.name}: {schedule.num_ranks} ranks, {schedule.num_chunks} micro-batches"
    fig.suptitle(title, fontsize=11, y=1 - 0.1 / fig_h_in, va="top")

    handles = []
    for op in (Op.FORWARD, Op.BACKWARD, Op.INPUT, Op.WEIGHT):
        for d in (0, 1):
            if (op, d) in kinds_seen:
                suffix = f", {names[d]}" if d < len(names) and names[d] else ""
                handles.append(
                    Patch(
                        facecolor=COLORS[op][d],
                        edgecolor=_EDGE,
                        linewidth=0.5,
                        label=f"{KIND_NAMES[op]}{suffix}",
                    )
                )
    if has_pairs:
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="black",
                linewidth=1.9,
                label="overlapped forward & backward",
            )
        )
    if has_waits:
        handles.append(Patch(facecolor=_WAIT_COLOR, edgecolor="none", label="waiting to receive"))
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=ncol,
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 0.04 / fig_h_in),
            handlelength=1.6,
            columnspacing=1.4,
            borderaxespad=0.0,
            borderpad=0.0,
        )
    fig.savefig(os.fspath(path), dpi=dpi)


_MEMORY_FILL = "#8FB8DE"
"""Fill colour of the memory rows."""


def _draw_memory(
    ax: Any, memory: Sequence[Sequence[tuple[float, float]]], rows: int, t0: float, span: float
) -> None:
    """One row per rank: the bytes held as a step curve, scaled to the largest peak of
    any rank, with the rank's peak in MiB at the right."""
    top = max((b for row in memory for _, b in row), default=0.0) or 1.0
    for r, row in enumerate(memory):
        if not row:
            continue
        xs = [t0] + [t for t, _ in row]
        ys = [0.0] + [b for _, b in row]
        base = r + 0.42
        scaled = [base - 0.84 * y / top for y in ys]
        ax.fill_between(xs, scaled, base, step="post", color=_MEMORY_FILL, linewidth=0, zorder=2)
        ax.step(xs, scaled, where="post", color="#2B5D8A", linewidth=0.8, zorder=3)
        peak = max(ys)
        ax.text(t0 + span, r, f" {peak / 2**20:.2f} MiB", fontsize=7, va="center",
                ha="left", color="#2B5D8A")
    ax.set_xlim(t0, t0 + span)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_yticks(range(rows))
    ax.set_yticklabels([f"memory {r}" for r in range(rows)], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.6, zorder=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
