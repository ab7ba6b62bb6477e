"""Pairing: two consecutive actions of a rank merged into an overlapped pair (F+F, B+B)
wherever the halves are independent and simulation with per-part costs says it is faster."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ScheduleError
from .partcosts import PartCosts
from .schedules.actions import Action, Op, Overlap, PairKind, Step
from .schedules.dependency import needs_result
from .schedules.schedule import Schedule
from .schedules.validate import validate
from .simulation import Costs, simulate

__all__ = ["NOMINAL_PARTS", "PAIRABLE", "pair_steps"]

NOMINAL_PARTS = PartCosts((1.0, 1.0, 1.0), (1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0),
                          (1.0, 1.0))
"""The parted stage :func:`pair_steps` decides by when no costs are known: three
computation parts of equal cost, separated by two communications of that cost each (an
MoE layer: attention, dispatch, experts, combine, the rest)."""

PAIRABLE = (PairKind.FF, PairKind.BB)
"""The kinds :func:`pair_steps` makes (the generators make the F&B pairs)."""


def _pair(rank: int, schedule: Schedule, a: Step, b: Step,
          kinds: tuple[PairKind, ...]) -> Overlap | None:
    """``a`` and ``b`` as one pair of an allowed kind, if they can overlap."""
    if not (isinstance(a, Action) and isinstance(b, Action)):
        return None
    if Op.WEIGHT in (a.op, b.op) or (a.op is Op.FORWARD) != (b.op is Op.FORWARD):
        return None
    pair = Overlap(a, b)
    if pair.kind not in kinds:
        return None
    layout = schedule.layout
    if needs_result(layout, rank, b, a) or needs_result(layout, rank, a, b):
        return None
    return pair


def _is_weight(step: Step) -> bool:
    return isinstance(step, Action) and step.op is Op.WEIGHT


def _makespan(schedule: Schedule, costs: Costs) -> float | None:
    try:
        return simulate(schedule, costs).makespan
    except ScheduleError:  # the pair made a rank wait for itself: not a candidate
        return None


def pair_steps(schedule: Schedule, parts: PartCosts | None = None,
               kinds: Iterable[PairKind] = PAIRABLE, comm: float = 0.0) -> Schedule:
    """``schedule`` with consecutive single actions of a rank merged into pairs of
    ``kinds`` (two forwards: the warm-up; two backwards: the cool-down) wherever the two
    are independent (neither needs the other's result) and the simulated step — per-part
    costs ``parts`` (:data:`NOMINAL_PARTS` when None), pipeline latency ``comm`` — gets
    no slower; the result is returned only if it is faster than ``schedule`` (else
    ``schedule`` itself) and passes :func:`~dualpipe.schedules.validate`.

    Two actions separated by ``W`` steps only pair too (the ``W`` steps then follow the
    pair). Greedy, rank by rank and left to right; each candidate costs one simulation."""
    allowed = tuple(PairKind(k) for k in kinds)
    costs = Costs(parts=parts if parts is not None else NOMINAL_PARTS, comm=comm)
    best = _makespan(schedule, costs)
    if best is None:
        raise ScheduleError(f"{schedule.name}: cannot simulate the schedule to pair it")
    start = best
    rows = [list(r) for r in schedule.steps]
    for rank, row in enumerate(rows):
        i = 0
        while i + 1 < len(row):
            # the next action, or the one after the W steps that follow this one (the W
            # moves after the pair: it needs only its own I, and fills waits anyway)
            j = i + 1
            while j + 1 < len(row) and _is_weight(row[j]):
                j += 1
            pair = _pair(rank, schedule, row[i], row[j], allowed)
            if pair is not None:
                trial = [*row[:i], pair, *row[i + 1:j], *row[j + 1:]]
                candidate = _with_row(schedule, rows, rank, trial)
                span = _makespan(candidate, costs)
                if span is not None and span <= best + 1e-9:
                    rows[rank] = row = trial
                    best = span
            i += 1
    if best >= start - 1e-9:
        return schedule
    out = _with_row(schedule, rows, -1, [])
    validate(out)
    return out


def _with_row(schedule: Schedule, rows: list[list[Step]], rank: int,
              row: list[Step]) -> Schedule:
    steps = tuple(tuple(row if r == rank else rows[r]) for r in range(len(rows)))
    return Schedule(schedule.name, schedule.layout, schedule.chunks_per_stream, steps)
