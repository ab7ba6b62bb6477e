"""The measured record of one step on one rank (what :mod:`.timeline` gathers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..overlap.engine import PartEvent
from ..schedules.actions import Action, Overlap

__all__ = ["StepRecord"]


@dataclass
class StepRecord:
    """Measured timeline of one step on this rank (``time.perf_counter`` seconds;
    ``origin`` is the step's start and ``wall`` the same instant in ``time.time``).

    ``steps`` holds ``(step, start, end)`` for every executed step (actions or pairs),
    ``waits`` holds ``(label, start, end)`` for the time spent blocked on receives,
    ``parts`` the part-level events of stages written as parts (computation parts,
    communications in flight, waits on them, weight work filling them).
    """

    origin: float
    wall: float
    steps: list[tuple[Action | Overlap, float, float]] = field(default_factory=list)
    waits: list[tuple[str, float, float]] = field(default_factory=list)
    parts: list[PartEvent] = field(default_factory=list)
