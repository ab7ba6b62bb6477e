"""Schedule actions: the printable, parseable records every rank executes."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["Op", "Action", "Overlap", "Step", "parse_step", "format_step", "step_actions"]


class Op(str, enum.Enum):
    """Kind of an action."""

    FORWARD = "F"
    BACKWARD = "B"  # full backward: input and weight gradients
    INPUT = "I"  # input-only ("zero-bubble") backward; weight work deferred
    WEIGHT = "W"  # deferred weight-gradient work of one earlier INPUT

    @property
    def is_backward(self) -> bool:
        """True for the two kinds that produce input gradients (B and I)."""
        return self in (Op.BACKWARD, Op.INPUT)


@dataclass(frozen=True, slots=True)
class Action:
    """One operation of one rank: ``op`` on its ``phase`` for micro-batch ``chunk``."""

    op: Op
    phase: int
    chunk: int

    def __post_init__(self) -> None:
        if self.phase < 0 or self.chunk < 0:
            raise ValueError(f"phase and chunk must be >= 0, got {self.phase}, {self.chunk}")

    def __str__(self) -> str:
        return f"{self.op.value}{self.phase}.{self.chunk}"


@dataclass(frozen=True, slots=True)
class Overlap:
    """A forward and a backward issued as one pair (``FB`` in docs/schedules.md)."""

    forward: Action
    backward: Action

    def __post_init__(self) -> None:
        if self.forward.op is not Op.FORWARD:
            raise ValueError(f"first half of a pair must be a forward, got {self.forward}")
        if not self.backward.op.is_backward:
            raise ValueError(f"second half of a pair must be B or I, got {self.backward}")

    def __str__(self) -> str:
        return f"{self.forward}+{self.backward}"


Step = Action | Overlap

_ACTION_RE = re.compile(r"([FBIW])(\d+)\.(\d+)")


def _parse_action(token: str) -> Action:
    match = _ACTION_RE.fullmatch(token)
    if match is None:
        raise ValueError(f"not an action token: {token!r} (expected e.g. F0.3, B1.0, I0.2, W1.4)")
    return Action(Op(match.group(1)), int(match.group(2)), int(match.group(3)))


def parse_step(token: str) -> Step:
    """Parse one token (``F0.1``, ``W1.3``, ``F0.2+I1.0``...) into a step."""
    token = token.strip()
    if "+" in token:
        left, _, right = token.partition("+")
        return Overlap(_parse_action(left), _parse_action(right))
    return _parse_action(token)


def format_step(step: Step) -> str:
    """The token of a step (inverse of :func:`parse_step`)."""
    return str(step)


def step_actions(step: Step) -> tuple[Action, ...]:
    """The actions of a step in issue order (one, or forward then backward for a pair)."""
    if isinstance(step, Overlap):
        return (step.forward, step.backward)
    return (step,)
