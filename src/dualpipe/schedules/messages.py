"""Communication derived from a schedule: who sends what to whom, and when."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .actions import Action, Op, step_actions
from .dependency import dependency
from .schedule import Schedule

__all__ = ["Message", "RankMessages", "derive_messages"]


@dataclass(frozen=True, slots=True)
class Message:
    """One point-to-point message of one step.

    Attributes:
        src, dst: sending and receiving rank (always different).
        grad: False for activations (forward outputs), True for input gradients.
        stream, position: the path and the position of the *producing* stage.
        chunk: micro-batch id within the stream.
        header: True for the metadata message that precedes a boundary's first
            activation of the step.
        seq: index among all messages from ``src`` to ``dst`` in this step
            (sender order); used as the tag.
    """

    src: int
    dst: int
    grad: bool
    stream: int
    position: int
    chunk: int
    header: bool
    seq: int


@dataclass
class RankMessages:
    """Everything one rank needs to run its list.

    Attributes:
        rank: this rank.
        actions: the rank's actions in issue order (pairs flattened F then B).
        pair_of: for each action index, the index of its partner in an overlapped
            pair (or None).
        sends: per action index, messages to post right after it.
        recvs: per action index, messages that must have arrived before it.
        incoming: per source rank, every message from it, in sender order.
    """

    rank: int
    actions: list[Action]
    pair_of: list[int | None]
    sends: list[list[Message]] = field(default_factory=list)
    recvs: list[list[Message]] = field(default_factory=list)
    incoming: dict[int, list[Message]] = field(default_factory=dict)


def _flatten(
    schedule: Schedule, rank: int, forward_only: bool
) -> tuple[list[Action], list[int | None]]:
    actions: list[Action] = []
    pair_of: list[int | None] = []
    for step in schedule.steps[rank]:
        parts = list(step_actions(step))
        if forward_only:
            parts = [a for a in parts if a.op is Op.FORWARD]
        base = len(actions)
        actions.extend(parts)
        if len(parts) == 2:
            pair_of.extend([base + 1, base])
        else:
            pair_of.extend([None] * len(parts))
    return actions, pair_of


def derive_messages(
    schedule: Schedule, forward_only: bool = False, headers: bool = True
) -> list[RankMessages]:
    """Derive every rank's sends and receives from ``schedule``.

    With ``forward_only`` (inference), backward and weight actions are dropped and
    only activations flow. ``headers=False`` leaves out the metadata messages (for
    steps whose shapes are already known to every receiver).
    """
    layout = schedule.layout
    plans = []
    for rank in range(schedule.num_ranks):
        actions, pair_of = _flatten(schedule, rank, forward_only)
        plans.append(RankMessages(rank, actions, pair_of))

    # who consumes each result on another rank: the dependency rule, read from the consumer
    Key = tuple[bool, int, int, int]  # (gradient?, stream, position, chunk) of a result
    needs: list[list[tuple[Key, int] | None]] = []
    consumer: dict[Key, int] = {}
    for plan in plans:
        row: list[tuple[Key, int] | None] = []
        for action in plan.actions:
            dep = dependency(layout, plan.rank, action)
            if dep is None or dep.op is Op.INPUT or dep.rank == plan.rank:
                row.append(None)
                continue
            key = (dep.op is not Op.FORWARD, *dep.key)
            consumer[key] = plan.rank
            row.append((key, dep.rank))
        needs.append(row)

    counters: dict[tuple[int, int], int] = defaultdict(int)
    announced: set[tuple[int, int]] = set()
    produced: dict[Key, list[Message]] = {}
    for plan in plans:
        plan.sends = [[] for _ in plan.actions]
        plan.recvs = [[] for _ in plan.actions]
        for i, action in enumerate(plan.actions):
            if action.op is Op.WEIGHT:
                continue
            stream, pos = layout.locate(plan.rank, action.phase)
            grad = action.op.is_backward
            dst = consumer.get((grad, stream, pos, action.chunk))
            if dst is None:
                continue
            kinds = [False]  # payload; preceded by a header on a boundary's first message
            if headers and not grad and (stream, pos) not in announced:
                announced.add((stream, pos))
                kinds.insert(0, True)
            out = []
            for header in kinds:
                seq = counters[(plan.rank, dst)]
                counters[(plan.rank, dst)] += 1
                out.append(Message(plan.rank, dst, grad, stream, pos, action.chunk, header, seq))
            plan.sends[i] = out
            produced[(grad, stream, pos, action.chunk)] = out

    for plan, row in zip(plans, needs, strict=True):
        incoming: dict[int, list[Message]] = defaultdict(list)
        for i, need in enumerate(row):
            if need is None:
                continue
            key, src = need
            msgs = produced.get(key)
            if msgs is None:
                raise ValueError(
                    f"rank {plan.rank}: {plan.actions[i]} needs a message nobody sends"
                )
            plan.recvs[i] = msgs
            incoming[src].extend(msgs)
        plan.incoming = {src: sorted(ms, key=lambda m: m.seq) for src, ms in incoming.items()}
    return plans
