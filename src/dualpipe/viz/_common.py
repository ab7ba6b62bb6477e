"""Shared helpers of the renderers: split timed steps into drawable segments.

Pure Python; imports neither torch nor matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..schedules.actions import Action, Op, Overlap
from ..schedules.schedule import Schedule
from ..simulation import TimedStep

__all__ = [
    "TimedWait", "Segment", "segments", "all_segments", "direction", "direction_names",
    "time_span",
]

KIND_NAMES: dict[Op, str] = {
    Op.FORWARD: "forward",
    Op.BACKWARD: "backward",
    Op.INPUT: "backward for input",
    Op.WEIGHT: "backward for weights",
}
"""Human names of the four kinds (the seed figure's wording)."""


@dataclass(frozen=True)
class TimedWait:
    """Time ``rank`` spent blocked, e.g. waiting to receive ``label`` (``recv F0.3``).

    The runtime records these next to its measured :class:`~dualpipe.simulation.TimedStep`
    rows; the renderers draw them as grey bars (PNG), ``~`` (text) or a
    ``recv wait`` thread (trace).
    """

    rank: int
    label: str
    start: float
    end: float


@dataclass(frozen=True)
class Segment:
    """One action of one timed step, with where it sits in the layout.

    An overlapped pair gives two segments: its forward in the first half of the
    pair's time, its backward in the second half (``half`` 1 and 2).
    """

    row: int
    rank: int
    action: Action
    start: float
    end: float
    direction: int
    stream: int
    stage: int
    global_chunk: int
    pair: Overlap | None
    half: int

    @property
    def token(self) -> str:
        """The action's token, e.g. ``F0.3``."""
        return str(self.action)


def direction(schedule: Schedule, rank: int, action: Action) -> int:
    """Which of (at most) two colour shades an action gets.

    With two streams (DualPipe) this is the stream (0 down, 1 up); with one
    stream and two phases (DualPipeV) it is the phase (0 down the V, 1 back up);
    otherwise 0.
    """
    layout = schedule.layout
    if layout.num_streams > 1:
        return layout.locate(rank, action.phase)[0]
    return action.phase if layout.num_phases > 1 else 0


def _goes_down(ranks: Sequence[int]) -> bool | None:
    if len(ranks) < 2 or ranks[0] == ranks[-1]:
        return None
    return ranks[-1] > ranks[0]


def direction_names(schedule: Schedule) -> list[str]:
    """Readable names of the directions :func:`direction` returns, index by index."""
    layout = schedule.layout
    words = {True: "down", False: "up", None: ""}
    if layout.num_streams > 1:
        names = []
        for s, path in enumerate(layout.paths):
            way = words[_goes_down([r for r, _ in path])]
            names.append(f"{way} (from rank {path[0][0]})" if way else f"stream {s}")
        return names
    if layout.num_phases > 1:
        names = []
        for p in range(layout.num_phases):
            ranks = [r for r, q in layout.paths[0] if q == p]
            way = words[_goes_down(ranks)]
            names.append(f"phase {p} ({way})" if way else f"phase {p}")
        return names
    return [""]


def segments(row: int, timed: TimedStep, schedule: Schedule) -> list[Segment]:
    """The segments of one timed step (one, or two for a pair)."""
    step = timed.step
    layout = schedule.layout
    rank = timed.rank

    def make(action: Action, start: float, end: float, pair: Overlap | None, half: int) -> Segment:
        stream, _ = layout.locate(rank, action.phase)
        return Segment(
            row=row,
            rank=rank,
            action=action,
            start=start,
            end=end,
            direction=direction(schedule, rank, action),
            stream=stream,
            stage=layout.stage(rank, action.phase),
            global_chunk=schedule.global_chunk(rank, action),
            pair=pair,
            half=half,
        )

    if isinstance(step, Overlap):
        mid = (timed.start + timed.end) / 2
        return [
            make(step.first, timed.start, mid, step, 1),
            make(step.second, mid, timed.end, step, 2),
        ]
    return [make(step, timed.start, timed.end, None, 0)]


def all_segments(timeline: Sequence[Sequence[TimedStep]], schedule: Schedule) -> Iterator[Segment]:
    """Every segment of a timeline, row by row, in time order within a row."""
    for row, steps in enumerate(timeline):
        for timed in steps:
            yield from segments(row, timed, schedule)


def time_span(
    timeline: Sequence[Sequence[TimedStep]], waits: Sequence[Sequence[TimedWait]] | None = None
) -> tuple[float, float]:
    """``(first start, last end)`` over all steps and waits; ``(0, 0)`` when empty."""
    starts = [t.start for row in timeline for t in row]
    ends = [t.end for row in timeline for t in row]
    for row in waits or ():
        for w in row:
            starts.append(w.start)
            ends.append(w.end)
    if not starts:
        return 0.0, 0.0
    return min(starts), max(ends)
