"""Measured timelines: gather every rank's recorded step onto one time axis (collective)."""

from __future__ import annotations

import torch.distributed as dist

from ..measured import MeasuredTimeline, measured_costs
from ..schedules.actions import parse_step
from ..schedules.schedule import Schedule
from ..simulation import TimedStep
from ..viz import TimedWait
from .record import StepRecord

__all__ = ["MeasuredTimeline", "gather_timeline", "measured_costs"]


def _local_rows(record: StepRecord, rank: int) -> list:
    steps = [(str(s), a - record.origin, b - record.origin) for s, a, b in record.steps]
    waits = [(label, a - record.origin, b - record.origin) for label, a, b in record.waits]
    memory = [(t - record.origin, held) for t, held in record.memory]
    return [record.wall, rank, steps, waits, memory]


def gather_timeline(
    record: StepRecord,
    schedule: Schedule,
    rank: int,
    group: dist.ProcessGroup | None = None,
    dst: int | None = 0,
) -> MeasuredTimeline | None:
    """Collective: every rank calls it; pipeline rank ``dst`` gets the timeline (every
    rank with ``dst=None``)."""
    payload = _local_rows(record, rank)
    everything: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everything, payload, group=group)
    if dst is not None and rank != dst:
        return None
    origin = min(p[0] for p in everything)
    steps: list[list[TimedStep]] = [[] for _ in everything]
    waits: list[list[TimedWait]] = [[] for _ in everything]
    memory: list[list[tuple[float, int]]] = [[] for _ in everything]
    for wall, r, rows, wrows, mrows in everything:
        shift = (wall - origin) * 1000.0
        steps[r] = [
            TimedStep(r, parse_step(tok), shift + a * 1000.0, shift + b * 1000.0)
            for tok, a, b in rows
        ]
        waits[r] = [
            TimedWait(r, label, shift + a * 1000.0, shift + b * 1000.0) for label, a, b in wrows
        ]
        memory[r] = [(shift + t * 1000.0, held) for t, held in mrows]
    return MeasuredTimeline(schedule, steps, waits, memory)
