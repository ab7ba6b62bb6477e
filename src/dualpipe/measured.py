"""A measured step of every rank (what the runtime records, gathered on one time axis)
and the simulator costs it implies; pure Python, like the simulator."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

from .schedules.actions import Overlap, PairKind
from .schedules.schedule import Schedule
from .simulation import Costs, TimedStep
from .viz import TimedWait, render_png, write_trace

__all__ = ["MeasuredTimeline", "measured_costs"]


@dataclass
class MeasuredTimeline:
    """One measured step of every rank (times in ms from the step's start); ``memory``:
    per rank, ``(time, bytes)`` held after every action and at the step's end (empty
    when not measured)."""

    schedule: Schedule
    steps: list[list[TimedStep]]
    waits: list[list[TimedWait]]
    memory: list[list[tuple[float, int]]] = field(default_factory=list)

    @property
    def peak_memory(self) -> list[int]:
        """Per rank, the most bytes held after an action (0 where not measured)."""
        rows = self.memory or [[] for _ in self.steps]
        return [max((held for _, held in row), default=0) for row in rows]

    @property
    def makespan(self) -> float:
        """Time from the first rank's start to the last rank's end."""
        return max((row[-1].end for row in self.steps if row), default=0.0)

    @property
    def busy(self) -> list[float]:
        """Per rank, time spent computing (inside steps)."""
        return [sum(t.end - t.start for t in row) for row in self.steps]

    @property
    def bubble(self) -> list[float]:
        """Per rank, makespan minus busy time."""
        return [self.makespan - b for b in self.busy]

    @property
    def idle(self) -> list[float]:
        """Per rank, the step's time not spent computing: gaps between actions plus time
        blocked on receives inside an action (a rank that waits for its input inside a
        timed action is idle too)."""
        idle = []
        for busy, steps, waits in zip(self.busy, self.steps, self.waits, strict=True):
            inside = sum(
                max(0.0, min(w.end, t.end) - max(w.start, t.start)) for w in waits for t in steps
            )
            idle.append(self.makespan - busy + inside)
        return idle

    def save_png(self, path: str | os.PathLike[str], title: str | None = None) -> None:
        """Draw the step to a PNG (one row per rank, waits as grey bars; needs matplotlib)."""
        if title is None:
            title = (
                f"{self.schedule.name}: measured step on {self.schedule.num_ranks} ranks, "
                f"{self.schedule.num_chunks} micro-batches ({self.makespan:.1f} ms)"
            )
        render_png(self.steps, self.schedule, path, title=title, waits=self.waits,
                   time_unit="ms", memory=self.memory or None)

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the step as a Chrome / Perfetto trace (JSON; open in ``ui.perfetto.dev``
        or ``chrome://tracing``)."""
        write_trace(self.steps, self.schedule, path, waits=self.waits)


def measured_costs(timeline: MeasuredTimeline) -> Costs:
    """Median per-action times of a measured step, as simulator costs (ms).

    ``w`` comes from W actions, ``b`` from full backwards (or ``I`` + ``w``), ``fb``
    from F+B pairs (pairs of two forwards or two backwards are left out); missing kinds
    fall back to sums of the others."""
    times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": [], "FB": []}
    for row in timeline.steps:
        for t in row:
            if isinstance(t.step, Overlap) and t.step.kind is not PairKind.FB:
                continue
            key = "FB" if isinstance(t.step, Overlap) else t.step.op.value
            times[key].append(t.end - t.start)

    def med(key: str) -> float | None:
        return statistics.median(times[key]) if times[key] else None

    f = med("F") or 0.0
    w = med("W") or 0.0
    b = med("B")
    i = med("I")
    if b is None:
        b = (i or 0.0) + w
    w = min(w, b)
    fb = med("FB")
    return Costs(f=f, b=b, w=w, fb=fb if fb is not None else f + b)

