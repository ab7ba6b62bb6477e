"""Terminal rendering of a timeline: one line per rank, time scaled to a width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..schedules.actions import Action, Overlap
from ..schedules.schedule import Schedule
from ..simulation import TimedStep
from ._common import direction, direction_names, time_span

if TYPE_CHECKING:
    from ._common import TimedWait

__all__ = ["render_text", "render_tokens"]

_IDLE = " "
_WAIT = "~"
_FILL = "-"
_PAIR_FILL = "="


def _letter(schedule: Schedule, rank: int, action: Action) -> str:
    letter = action.op.value
    return letter.lower() if direction(schedule, rank, action) == 1 else letter


def _labels(schedule: Schedule, timed: TimedStep) -> tuple[str, ...]:
    """Labels of a step, longest first: the first that fits its run is drawn."""
    step, rank = timed.step, timed.rank
    if isinstance(step, Overlap):
        f, b = _letter(schedule, rank, step.first), _letter(schedule, rank, step.second)
        return (
            f"{f}{step.first.chunk}+{b}{step.second.chunk}",
            f"{f}{step.first.chunk}{b}{step.second.chunk}",
            f"{f}+{b}",
            f"{f}{b}",
            f,
        )
    letter = _letter(schedule, rank, step)
    return (f"{letter}{step.chunk}", letter)


def _run(labels: tuple[str, ...], n: int, fill: str) -> str:
    for label in labels:
        if len(label) <= n:
            return label.ljust(n, fill)
    return labels[-1][:n]


def render_text(
    timeline: Sequence[Sequence[TimedStep]],
    schedule: Schedule,
    width: int = 120,
    waits: Sequence[Sequence[TimedWait]] | None = None,
    legend: bool = True,
) -> str:
    """Draw ``timeline`` as text, one line ``rank R |...|`` per rank.

    Args:
        timeline: per rank, the timed steps (simulated or measured).
        schedule: the schedule the timeline runs (for directions and labels).
        width: characters for the whole time span (at least 10).
        waits: optional per-rank waits, drawn as ``~`` where the rank is idle.
        legend: append a header line with the scale and a legend line.

    Returns:
        The lines joined by newlines (no trailing newline).
    """
    if width < 10:
        raise ValueError(f"width must be >= 10, got {width}")
    t0, t1 = time_span(timeline, waits)
    span = t1 - t0
    scale = width / span if span > 0 else 0.0

    def col(t: float) -> int:
        return min(width, max(0, round((t - t0) * scale)))

    rows = max(len(timeline), schedule.num_ranks)
    pad = len(str(rows - 1))
    lines = []
    if legend:
        lines.append(f"{'':>{pad + 5}} time {t0:g} .. {t1:g}, one column = {span / width:.3g}")
    for row in range(rows):
        cells = [_IDLE] * width
        if waits is not None and row < len(waits):
            for w in waits[row]:
                for c in range(col(w.start), col(w.end)):
                    cells[c] = _WAIT
        for timed in timeline[row] if row < len(timeline) else ():
            a, b = col(timed.start), col(timed.end)
            if b <= a:  # too short for a column: take one if it is free
                if a >= width or cells[a] not in (_IDLE, _WAIT):
                    continue
                b = a + 1
            fill = _PAIR_FILL if isinstance(timed.step, Overlap) else _FILL
            cells[a:b] = _run(_labels(schedule, timed), b - a, fill)
        lines.append(f"rank {row:>{pad}} |{''.join(cells)}|")
    if legend:
        names = [n for n in direction_names(schedule) if n]
        case = f"; upper case {names[0]}, lower case {names[1]}" if len(names) == 2 else ""
        lines.append(
            "F forward, B backward, I backward for input, W backward for weights, "
            f"X+y overlapped pair; digits = micro-batch{case}"
            + ("; ~ waiting to receive" if waits is not None else "")
        )
    return "\n".join(lines)


def render_tokens(
    timeline: Sequence[Sequence[TimedStep]],
    schedule: Schedule,
    min_gap: float = 1e-9,
) -> str:
    """Compact view: ``rank R: TOKEN TOKEN (idle 2) TOKEN ...`` per rank, in time order.

    Idle gaps longer than ``min_gap`` appear as ``(idle D)`` between the tokens,
    including one before the first step when the rank starts late.
    """
    t0, _ = time_span(timeline)
    lines = []
    for row, steps in enumerate(timeline):
        words: list[str] = []
        last = t0
        for timed in sorted(steps, key=lambda t: t.start):
            gap = timed.start - last
            if gap > min_gap:
                words.append(f"(idle {gap:.4g})")
            words.append(str(timed.step))
            last = max(last, timed.end)
        lines.append(f"rank {row}: " + " ".join(words))
    return "\n".join(lines)
