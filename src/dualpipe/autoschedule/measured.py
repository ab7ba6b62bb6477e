"""Costs for the search from a measured step (``pipe.step(..., record=True)`` then
``pipe.gather_timeline()``): median action times, and the message latency seen there."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from ..measured import MeasuredTimeline, measured_costs
from ..schedules.schedule import Schedule
from ..simulation import Costs, TimedStep
from .refine import compile_schedule

__all__ = ["costs_from_timeline", "message_latency"]


def message_latency(schedule: Schedule, rows: Sequence[Sequence[TimedStep]]) -> float:
    """Median delay between the end of an action on one rank and the start of a step on
    another rank that was waiting for its result (0 when no step waited for a message).

    ``rows`` are the steps of ``schedule`` placed in time, per rank, in list order (a
    measured timeline's ``steps``, or a simulated ``timeline``).
    """
    order = Schedule(
        schedule.name,
        schedule.layout,
        schedule.chunks_per_stream,
        tuple(tuple(t.step for t in row) for row in rows),
    )
    compiled = compile_schedule(order, Costs())
    ends: dict[int, float] = {}
    maker: dict[int, int] = {}
    for r, row in enumerate(rows):
        for item, timed in zip(compiled.rows[r], row, strict=True):
            for rid in item.makes:
                ends[rid], maker[rid] = timed.end, r
    gaps: list[float] = []
    for r, row in enumerate(rows):
        for k, timed in enumerate(row):
            needs = [rid for rid, _ in compiled.rows[r][k].needs]
            remote = [ends[rid] for rid in needs if maker[rid] != r]
            ready = max([row[k - 1].end if k else 0.0, *(ends[x] for x in needs if maker[x] == r)])
            if remote and timed.start > ready + 1e-9:  # it waited for a message
                gaps.append(timed.start - max(remote))
    return statistics.median(gaps) if gaps else 0.0


def costs_from_timeline(timeline: MeasuredTimeline) -> Costs:
    """Search costs from a measured step: the runtime's median F, B, W and F&B times
    (:func:`dualpipe.measured.measured_costs`) with ``comm`` set to the
    :func:`message_latency` seen in that step (ms)."""
    return replace(
        measured_costs(timeline), comm=message_latency(timeline.schedule, timeline.steps)
    )
