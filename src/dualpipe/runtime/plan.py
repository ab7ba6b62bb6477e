"""One rank's execution plan, derived once from a schedule: for every action, where its
inputs come from, where its outputs go, and which receives are posted before it."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from ..schedules.actions import Action, Op, Overlap
from ..schedules.messages import Message, RankMessages, derive_messages
from ..schedules.order import message_order
from ..schedules.schedule import Schedule

__all__ = ["Route", "StepKind", "HandOff", "ActionPlan", "PlannedStep", "Issue", "ExecutionPlan",
           "build_plan", "build_plans", "LOOKAHEAD"]

LOOKAHEAD = 4
"""Receives are posted (in issue order) for the next this-many actions."""

HandOff = tuple[bool, int, int, int]
"""Key of a local hand-off: ``(grad, stream, producing position, chunk)``."""


class Route(enum.Enum):
    """Where an action's inputs come from (``source``) or its outputs go (``sink``)."""

    DATA = "data"  # forward source: the step's inputs of this micro-batch
    LOSS = "loss"  # forward sink: the criterion; backward source: the loss itself
    LOCAL = "local"  # a hand-off to or from another stage on this rank
    MESSAGE = "message"  # point-to-point messages with another rank
    NONE = "none"  # nothing: a W, or the input gradients of the first stage


class StepKind(enum.Enum):
    """What one entry of a rank's list is: a single action of each kind, or a pair."""

    FORWARD = "F"
    BACKWARD = "B"
    INPUT = "I"
    WEIGHT = "W"
    PAIR = "pair"  # two actions overlapped (F+B, F+F or B+B)

    @classmethod
    def of(cls, op: Op) -> StepKind:
        """The kind of a single action of ``op``."""
        return cls(op.value)


@dataclass(frozen=True)
class ActionPlan:
    """One action of this rank with everything its handler needs.

    Attributes:
        index: position in the rank's flattened action list (a pair: its first, then second).
        action: the action.
        module: index of the module it runs in the rank's module tuple.
        stream, position: the path and the position on it computed here.
        source, sink: where inputs come from and outputs go.
        source_key, sink_key: the local hand-off keys when the route is ``LOCAL``.
        boundary_in: ``(stream, position)`` of the boundary whose tensors arrive here
            by message (forward: the previous position; backward: this one).
        recvs: messages (header first, then payload) that must have arrived.
        sends: messages (header first, then payload) posted right after it.
    """

    index: int
    action: Action
    module: int
    stream: int
    position: int
    source: Route
    sink: Route
    source_key: HandOff | None
    sink_key: HandOff | None
    recvs: tuple[Message, ...]
    sends: tuple[Message, ...]

    @property
    def payload_recv(self) -> Message | None:
        """The message carrying the tensors (not the header), if any."""
        return next((m for m in self.recvs if not m.header), None)

    @property
    def header_send(self) -> bool:
        """True when this action's outputs are preceded by a shape header."""
        return any(m.header for m in self.sends)


@dataclass(frozen=True)
class PlannedStep:
    """One entry of the rank's list: a single action or an overlapped pair.

    Attributes:
        kind: a single action's kind, or :attr:`StepKind.PAIR`.
        label: the schedule's step (printed in errors and timelines).
        actions: its actions (a pair: forward then backward).
        due: how many of the rank's operations (:attr:`ExecutionPlan.ops`, in order)
            are issued before this step starts, at least: every receive it needs and
            those needed within the look-ahead (a send among them is issued once its
            action has run).
        finishes: the rank's modules whose gradient work of the step ends with this step
            (their last ``B`` or ``W``): plug-ins reduce gradients after it.
    """

    kind: StepKind
    label: Action | Overlap
    actions: tuple[ActionPlan, ...]
    due: int
    finishes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Issue:
    """One operation of a rank in a step: a send or a receive of ``message``, or of
    the step's stamp (``message is None``) to or from ``peer``."""

    peer: int
    send: bool
    message: Message | None

    def __str__(self) -> str:
        what = "stamp" if self.message is None else (
            f"{'header' if self.message.header else 'grad' if self.message.grad else 'act'}"
            f"#{self.message.seq}")
        return f"{'send' if self.send else 'recv'} {what} {'to' if self.send else 'from'} " \
               f"{self.peer}"


@dataclass(frozen=True)
class ExecutionPlan:
    """Everything one rank needs to run its list of one schedule.

    Attributes:
        rank: the pipeline rank.
        schedule: the schedule.
        training: False for forward-only inference (no backward, no gradients).
        headers: whether shape headers travel in this step.
        steps: the steps in issue order.
        incoming: per source rank, every message from it, in sender order.
        ops: every send and receive of the step, in the order the rank issues them:
            stamps first (ordered by sending rank, then receiving rank), then the
            messages in the global order shared by all ranks.
        index: position of each message in ``ops``.
    """

    rank: int
    schedule: Schedule
    training: bool
    headers: bool
    steps: tuple[PlannedStep, ...]
    incoming: dict[int, tuple[Message, ...]]
    ops: tuple[Issue, ...]
    index: dict[Message, int]

    @property
    def actions(self) -> list[ActionPlan]:
        """Every action in issue order."""
        return [a for step in self.steps for a in step.actions]

    @property
    def messages(self) -> list[Message]:
        """Every message this rank sends or receives in a step."""
        return [m for a in self.actions for m in (*a.sends, *a.recvs)]


def _routes(
    schedule: Schedule, rank: int, action: Action
) -> tuple[Route, Route, HandOff | None, HandOff | None]:
    layout = schedule.layout
    stream, pos = layout.locate(rank, action.phase)
    prev, nxt = layout.prev(rank, action.phase), layout.next(rank, action.phase)
    c = action.chunk

    def route(peer: tuple[int, int] | None, end: Route) -> Route:
        if peer is None:
            return end
        return Route.LOCAL if peer[0] == rank else Route.MESSAGE

    if action.op is Op.FORWARD:
        source, sink = route(prev, Route.DATA), route(nxt, Route.LOSS)
        return (source, sink, (False, stream, pos - 1, c) if source is Route.LOCAL else None,
                (False, stream, pos, c) if sink is Route.LOCAL else None)
    if action.op is Op.WEIGHT:
        return Route.NONE, Route.NONE, None, None
    source, sink = route(nxt, Route.LOSS), route(prev, Route.NONE)
    return (source, sink, (True, stream, pos + 1, c) if source is Route.LOCAL else None,
            (True, stream, pos, c) if sink is Route.LOCAL else None)


def build_plan(
    schedule: Schedule, rank: int, training: bool, headers: bool, lookahead: int = LOOKAHEAD
) -> ExecutionPlan:
    """Derive ``rank``'s execution plan of ``schedule`` (inference drops B, I and W)."""
    return build_plans(schedule, training, headers, lookahead, ranks=[rank])[0]


def build_plans(
    schedule: Schedule, training: bool, headers: bool, lookahead: int = LOOKAHEAD,
    ranks: Sequence[int] | None = None,
) -> list[ExecutionPlan]:
    """The execution plans of ``ranks`` (default: every rank) of ``schedule``."""
    plans = derive_messages(schedule, not training, headers)
    order = message_order(plans)
    pairs = sorted({(m.src, m.dst) for plan in plans for msgs in plan.sends for m in msgs})
    return [_build(schedule, plans, order, pairs, rank, training, headers, lookahead)
            for rank in (range(schedule.num_ranks) if ranks is None else ranks)]


def _build(
    schedule: Schedule, plans: list[RankMessages], order: dict[Message, int],
    pairs: list[tuple[int, int]], rank: int, training: bool, headers: bool, lookahead: int,
) -> ExecutionPlan:
    comm = plans[rank]
    layout = schedule.layout

    # the stamps of every pair of neighbouring ranks, then the messages in global order
    ops = [Issue(dst if src == rank else src, src == rank, None)
           for src, dst in pairs if rank in (src, dst)]
    mine = [m for m in order if rank in (m.src, m.dst)]  # (insertion order is the order)
    ops += [Issue(m.dst if m.src == rank else m.src, m.src == rank, m) for m in mine]
    index = {op.message: k for k, op in enumerate(ops) if op.message is not None}

    # issued before action i: every receive needed by action i + lookahead - 1
    need = [max((index[m] + 1 for m in msgs), default=0) for msgs in comm.recvs]
    due_at, latest = [], 0
    for i in range(len(comm.actions)):
        latest = max([latest, *need[i : i + max(1, lookahead)]])
        due_at.append(latest)

    actions = []
    for i, action in enumerate(comm.actions):
        stream, pos = layout.locate(rank, action.phase)
        source, sink, skey, okey = _routes(schedule, rank, action)
        actions.append(ActionPlan(
            index=i, action=action, module=layout.module_index(rank, action.phase),
            stream=stream, position=pos, source=source, sink=sink, source_key=skey,
            sink_key=okey, recvs=tuple(comm.recvs[i]), sends=tuple(comm.sends[i]),
        ))

    # the last action of each module that computes gradients (B or W)
    last = {a.module: a.index for a in actions if a.action.op in (Op.BACKWARD, Op.WEIGHT)}
    steps: list[PlannedStep] = []
    i = 0
    while i < len(actions):
        partner = comm.pair_of[i]
        group = tuple(actions[i : i + 2]) if partner == i + 1 else (actions[i],)
        due = max(due_at[i + len(group) - 1], due_at[i])
        if len(group) == 2:
            label: Action | Overlap = Overlap(group[0].action, group[1].action)
            kind = StepKind.PAIR
        else:
            label = group[0].action
            kind = StepKind.of(label.op)
        finishes = tuple(sorted(m for m, k in last.items() if i <= k < i + len(group)))
        steps.append(PlannedStep(kind, label, group, due, finishes))
        i += len(group)
    incoming = {src: tuple(msgs) for src, msgs in comm.incoming.items()}
    return ExecutionPlan(rank, schedule, training, headers, tuple(steps), incoming, tuple(ops),
                         index)
