"""Pictures of one F&B pair's parts interleaved: a compute row and the communications in
flight, from simulated part costs or from the runtime's measured part events."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..partcosts import PartInterval

__all__ = ["render_pair_text", "render_pair_png"]

_ROWS = ("compute", "comm")
_TEXT_ROWS = ("compute", "comm F", "comm B")
_COLORS = {"F": "#F0963C", "B": "#4A8FD0", "W": "#9A77CF"}


def _row(iv: PartInterval) -> str:
    """``compute``, or the communication row of the interval's micro-batch (F or B)."""
    return "compute" if iv.resource == "compute" else f"comm {iv.label[:1]}"


def render_pair_text(intervals: Sequence[PartInterval], width: int = 72) -> str:
    """Three lines, ``compute``, ``comm F`` and ``comm B`` (the forward's and the
    backward's communications in flight): each interval is its label followed by ``-``
    for as long as it lasts (blank: idle), time scaled to ``width`` characters."""
    end = max((iv.end for iv in intervals), default=0.0)
    scale = width / end if end > 0 else 0.0
    lines = []
    for row in _TEXT_ROWS:
        cells = [" "] * width
        for iv in sorted((iv for iv in intervals if _row(iv) == row), key=lambda v: v.start):
            a = min(width - 1, int(round(iv.start * scale)))
            b = max(a + 1, min(width, int(round(iv.end * scale))))
            text = (iv.label + "-" * (b - a))[: b - a]
            cells[a:b] = list(text)
        lines.append(f"{row:>7} |{''.join(cells).rstrip()}")
    lines.append(f"{'':>7}  0{'':>{width - len(f'{end:g}') - 1}}{end:g}")
    return "\n".join(lines)


def render_pair_png(
    intervals: Sequence[PartInterval],
    path: str | os.PathLike[str],
    title: str | None = None,
    time_unit: str = "",
    dpi: int = 130,
) -> None:
    """Draw the pair to a PNG at ``path``: forward parts orange, backward blue, weight
    gradients purple; communications on the second row (the forward's above the
    backward's), labelled with the part after which they were launched."""
    from matplotlib.figure import Figure

    end = max((iv.end for iv in intervals), default=1.0) or 1.0
    fig = Figure(figsize=(max(6.0, min(16.0, 0.9 * len(intervals))), 1.9))
    ax = fig.add_subplot(1, 1, 1)
    for row, name in enumerate(_ROWS):
        y = len(_ROWS) - 1 - row
        for iv in intervals:
            if iv.resource != name:
                continue
            color = _COLORS.get(iv.label[:1], "#9A9A9A")
            # the two micro-batches' communications may be in flight at once: the
            # forward's in the upper half of the row, the backward's in the lower
            at, height = float(y), 0.7
            if name == "comm":
                at, height = y + (0.18 if iv.label[:1] == "F" else -0.18), 0.34
            ax.barh(at, iv.end - iv.start, left=iv.start, height=height, color=color,
                    edgecolor="#3A3A3A", linewidth=0.6, alpha=1.0 if name == "compute" else 0.6)
            if (iv.end - iv.start) / end > 0.035:
                ax.text((iv.start + iv.end) / 2, at, iv.label, ha="center", va="center",
                        fontsize=7)
    ax.set_yticks(range(len(_ROWS)))
    ax.set_yticklabels(list(reversed(_ROWS)))
    ax.set_xlim(0, end)
    ax.set_xlabel(f"time{f' ({time_unit})' if time_unit else ''}")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=dpi)
