"""The dependency rule, written once: which result each action needs."""

from __future__ import annotations

from dataclasses import dataclass

from .actions import Action, Op
from .layout import Layout, Position

__all__ = ["Dependency", "dependency", "needs_result"]


@dataclass(frozen=True, slots=True)
class Dependency:
    """The result an action needs.

    Attributes:
        op: the kind of the producing action: ``FORWARD`` (an activation or the
            loss), ``BACKWARD`` (an input gradient, made by ``B`` or ``I``) or
            ``INPUT`` (the deferred work a ``W`` runs).
        stream, index: the producing stage's stream and position on its path.
        chunk: micro-batch id within the stream.
        position: the producing ``(rank, phase)``.
    """

    op: Op
    stream: int
    index: int
    chunk: int
    position: Position

    @property
    def rank(self) -> int:
        """The rank that runs the producing action."""
        return self.position[0]

    @property
    def key(self) -> tuple[int, int, int]:
        """``(stream, index, chunk)``: the producing stage of that micro-batch."""
        return self.stream, self.index, self.chunk


def dependency(layout: Layout, rank: int, action: Action) -> Dependency | None:
    """What ``action`` on ``rank`` needs before it can run, or None (a first-stage forward).

    Raises ValueError if ``rank`` has no ``action.phase`` in ``layout``.
    """
    stream, index = layout.locate(rank, action.phase)
    path = layout.paths[stream]
    if action.op is Op.FORWARD:
        if index == 0:
            return None
        return Dependency(Op.FORWARD, stream, index - 1, action.chunk, path[index - 1])
    if action.op.is_backward:
        if index == len(path) - 1:
            return Dependency(Op.FORWARD, stream, index, action.chunk, path[index])
        return Dependency(Op.BACKWARD, stream, index + 1, action.chunk, path[index + 1])
    return Dependency(Op.INPUT, stream, index, action.chunk, path[index])


def needs_result(layout: Layout, rank: int, action: Action, other: Action) -> bool:
    """Whether ``action`` on ``rank`` needs the result of ``other``, run on the same rank
    (then the two cannot overlap as one pair)."""
    try:
        dep = dependency(layout, rank, action)
    except ValueError:
        return False  # a phase this rank does not hold: the validator reports it
    if dep is None or dep.op is Op.INPUT or other.op is Op.WEIGHT:
        return False
    made = Op.FORWARD if other.op is Op.FORWARD else Op.BACKWARD
    return dep.position == (rank, other.phase) and dep.chunk == other.chunk and dep.op is made
