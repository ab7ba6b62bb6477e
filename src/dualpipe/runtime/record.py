"""The measured record of one step on one rank (what :mod:`.timeline` gathers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schedules.actions import Action, Overlap

__all__ = ["PartEvent", "StepRecord"]


@dataclass(frozen=True)
class PartEvent:
    """One measured interval inside an action (``time.perf_counter`` seconds), as a
    plug-in that runs stages part by part reports it.

    ``kind`` is ``"compute"`` (a computation part, forward or backward), ``"comm"`` (a
    communication in flight, from launch until it completed, as its handles' futures
    report it; none for a communication launched untimed, ``InFlight(..., timed=False)``),
    ``"wait"`` (blocked on a communication, nothing else to do) or ``"weight"``
    (deferred weight-gradient work run while a communication was in flight).
    """

    label: str
    kind: str
    start: float
    end: float


@dataclass
class StepRecord:
    """Measured timeline of one step on this rank (``time.perf_counter`` seconds;
    ``origin`` is the step's start and ``wall`` the same instant in ``time.time``).

    ``steps`` holds ``(step, start, end)`` for every executed step (actions or pairs),
    ``waits`` holds ``(label, start, end)`` for the time spent blocked on receives,
    ``parts`` the part-level events of stages written as parts (computation parts,
    communications in flight, waits on them, weight work filling them), ``memory``
    ``(time, bytes)`` held after every step and at the step's end (saved activations,
    deferred weight-gradient state and the buffers of messages; see
    :class:`dualpipe.runtime.memory.MemoryProbe`).
    """

    origin: float
    wall: float
    steps: list[tuple[Action | Overlap, float, float]] = field(default_factory=list)
    waits: list[tuple[str, float, float]] = field(default_factory=list)
    parts: list[PartEvent] = field(default_factory=list)
    memory: list[tuple[float, int]] = field(default_factory=list)
