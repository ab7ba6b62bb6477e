"""Appending one rank's steps: micro-batch numbering per phase and deferred weight gradients."""

from __future__ import annotations

from collections import deque

from .actions import Action, Op, Overlap, Step

__all__ = ["RankBuilder", "drop_chunks"]


class RankBuilder:
    """Appends steps for one rank, numbering micro-batches and tracking deferred W's.

    The k-th forward of a phase takes micro-batch k, and so does the k-th backward;
    :meth:`w` runs the oldest deferred weight gradient (of one phase, if given).
    """

    def __init__(self, num_phases: int) -> None:
        self.steps: list[Step] = []
        self._next_f = [0] * num_phases
        self._next_b = [0] * num_phases
        self._deferred: deque[Action] = deque()

    def forwards(self, phase: int) -> int:
        """Forwards of ``phase`` appended so far."""
        return self._next_f[phase]

    def backwards(self, phase: int) -> int:
        """Backwards (B or I) of ``phase`` appended so far."""
        return self._next_b[phase]

    def _forward(self, phase: int) -> Action:
        action = Action(Op.FORWARD, phase, self._next_f[phase])
        self._next_f[phase] += 1
        return action

    def _backward(self, phase: int, zero_bubble: bool) -> Action:
        action = Action(Op.INPUT if zero_bubble else Op.BACKWARD, phase, self._next_b[phase])
        self._next_b[phase] += 1
        if zero_bubble:
            self._deferred.append(action)
        return action

    def f(self, phase: int) -> None:
        """Append the next forward of ``phase``."""
        self.steps.append(self._forward(phase))

    def b(self, phase: int, zero_bubble: bool = False) -> None:
        """Append the next backward of ``phase`` (input-only with ``zero_bubble``)."""
        self.steps.append(self._backward(phase, zero_bubble))

    def w(self, phase: int | None = None) -> None:
        """Append the W of the oldest deferred input-only backward (of ``phase`` if given)."""
        for done in self._deferred:
            if phase is None or done.phase == phase:
                self._deferred.remove(done)
                self.steps.append(Action(Op.WEIGHT, done.phase, done.chunk))
                return
        raise AssertionError("W with nothing deferred")  # generator bug

    def fb(self, f_phase: int, b_phase: int, zero_bubble: bool = False) -> None:
        """Append a pair: the next forward of ``f_phase`` and backward of ``b_phase``."""
        fwd = self._forward(f_phase)
        self.steps.append(Overlap(fwd, self._backward(b_phase, zero_bubble)))

    def pending_weights(self, phase: int | None = None) -> int:
        """Deferred weight gradients not yet run (of ``phase`` if given)."""
        return sum(phase is None or a.phase == phase for a in self._deferred)


def drop_chunks(steps: list[Step], num_chunks: int) -> tuple[Step, ...]:
    """``steps`` without the actions of micro-batches ``>= num_chunks``.

    Used to cut a schedule generated for more micro-batches down to fewer: every
    rank drops the same micro-batches, so each remaining action keeps its inputs
    and its place in its rank's order, and a deadlock-free schedule stays
    deadlock-free. A pair that loses one half becomes the other half alone.
    """
    kept: list[Step] = []
    for step in steps:
        if isinstance(step, Overlap):
            first, second = step.first.chunk < num_chunks, step.second.chunk < num_chunks
            if first and second:
                kept.append(step)
            elif first or second:
                kept.append(step.first if first else step.second)
        elif step.chunk < num_chunks:
            kept.append(step)
    return tuple(kept)
