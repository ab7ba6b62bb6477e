"""Schedule actions: the printable, parseable records every rank executes."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["Op", "Action", "Overlap", "PairKind", "Step", "parse_step", "format_step",
           "step_actions"]


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


class PairKind(str, enum.Enum):
    """What an overlapped pair interleaves (docs/schedules.md, "Pairs")."""

    FB = "FB"  # a forward and a backward (B or I) of two micro-batches: the steady state
    FF = "FF"  # two forwards: the warm-up
    BB = "BB"  # two backwards (B or I, any mix): the cool-down


@dataclass(frozen=True, slots=True)
class Overlap:
    """Two actions of one rank issued as one pair, their parts interleaved (``F0.3+B1.1``,
    ``F0.1+F0.2``, ``I0.8+I0.9``): a forward then a backward (:attr:`PairKind.FB`), two
    forwards (``FF``) or two backwards (``BB``). A ``W`` never pairs: deferred weight work
    fills the waits of any action instead."""

    first: Action
    second: Action

    def __post_init__(self) -> None:
        a, b = self.first, self.second
        if a.op is Op.WEIGHT or b.op is Op.WEIGHT:
            raise ValueError(f"a W does not pair (weight work fills waits): {a}+{b}")
        if a.op.is_backward and b.op is Op.FORWARD:
            raise ValueError(f"a pair of a forward and a backward is written forward first: "
                             f"{b}+{a}, not {a}+{b}")
        if a == b:
            raise ValueError(f"a pair of one action with itself: {a}+{b}")

    @property
    def kind(self) -> PairKind:
        """Which of the three kinds of pair this is."""
        if self.first.op is Op.FORWARD:
            return PairKind.FF if self.second.op is Op.FORWARD else PairKind.FB
        return PairKind.BB

    def __str__(self) -> str:
        return f"{self.first}+{self.second}"


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
    """The actions of a step in issue order (one, or a pair's first then second)."""
    if isinstance(step, Overlap):
        return (step.first, step.second)
    return (step,)
