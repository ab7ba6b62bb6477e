"""V-Half and V-Min: the controllable-memory V schedules of Qi et al., "Pipeline Parallelism
with Controllable Memory" (arXiv 2405.15362), on DualPipeV's layout."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .actions import Action, Op, Step
from .layout import dualpipev_layout
from .registry import register
from .schedule import Schedule

__all__ = ["Offsets", "V_HALF", "V_MIN", "building_block", "controllable_v", "v_half", "v_min"]

PERIOD = 6
"""Slots per micro-batch and rank: F(0), F(1), I(1), I(0), W(1), W(0)."""


@dataclass(frozen=True)
class Offsets:
    """Slots between a pass and the pass it needs, along the V of one micro-batch."""

    forward_down: int
    forward_turn: int
    forward_up: int
    backward_start: int
    backward_down: int
    backward_turn: int
    backward_up: int


V_MIN = Offsets(1, 1, 1, 1, 1, 1, 1)
"""Every pass as soon as its input exists: the shortest lifespans."""

V_HALF = Offsets(2, 1, 1, 1, 2, 2, 1)
"""Two slots per hop down the V and at the backward turn."""


def _block(n: int, o: Offsets, gap: int) -> list[tuple[int, int, int, int]]:
    """Per rank, the slots of F(0), F(1), I(1), I(0) of micro-batch 0."""
    f0 = [o.forward_down * r for r in range(n)]
    turn_f = f0[-1] + o.forward_turn
    f1 = [turn_f + o.forward_up * (n - 1 - r) for r in range(n)]
    start_b = f1[0] + o.backward_start + gap
    b1 = [start_b + o.backward_down * r for r in range(n)]
    turn_b = b1[-1] + o.backward_turn
    b0 = [turn_b + o.backward_up * (n - 1 - r) for r in range(n)]
    return [(f0[r], f1[r], b1[r], b0[r]) for r in range(n)]


def building_block(num_ranks: int, offsets: Offsets) -> list[tuple[int, int, int, int]]:
    """The slots of F(0), F(1), I(1), I(0) of micro-batch 0 on each rank, with the
    smallest gap before the backwards that lets the block repeat every 6 slots."""
    for gap in range(PERIOD):
        block = _block(num_ranks, offsets, gap)
        if all(len({t % PERIOD for t in slots}) == 4 for slots in block):
            return block
    raise AssertionError("no gap makes the block repeat")  # cannot happen: see tests


def _rank_steps(slots: tuple[int, int, int, int], num_chunks: int) -> list[Step]:
    """One rank's passes of every micro-batch, in slot order, W's in the free slots."""
    kinds = ((Op.FORWARD, 0), (Op.FORWARD, 1), (Op.INPUT, 1), (Op.INPUT, 0))
    timed: dict[int, Action] = {}
    for k in range(num_chunks):
        for (op, phase), start in zip(kinds, slots, strict=True):
            timed[start + PERIOD * k] = Action(op, phase, k)
    steps: list[Step] = []
    deferred: deque[Action] = deque()
    last = max(timed)
    for slot in range(last + 1):
        action = timed.get(slot)
        if action is not None:
            steps.append(action)
            if action.op is Op.INPUT:
                deferred.append(action)
        elif deferred:
            done = deferred.popleft()
            steps.append(Action(Op.WEIGHT, done.phase, done.chunk))
    steps.extend(Action(Op.WEIGHT, a.phase, a.chunk) for a in deferred)
    return steps


def controllable_v(num_ranks: int, num_chunks: int, offsets: Offsets, name: str) -> Schedule:
    """The V schedule that repeats the building block of ``offsets`` every 6 slots."""
    block = building_block(num_ranks, offsets)
    rows = tuple(tuple(_rank_steps(block[r], num_chunks)) for r in range(num_ranks))
    return Schedule(name, dualpipev_layout(num_ranks), num_chunks, rows)


@register(
    "v-half",
    label="V-Half",
    layout=dualpipev_layout,
    description="controllable-memory V (arXiv 2405.15362): about half of ZBV's activations",
)
def v_half(num_ranks: int, num_chunks: int) -> Schedule:
    """V-Half on ``num_ranks`` ranks (2N stages in a V) for ``num_chunks`` micro-batches."""
    return controllable_v(num_ranks, num_chunks, V_HALF, "v-half")


@register(
    "v-min",
    label="V-Min",
    layout=dualpipev_layout,
    description="controllable-memory V (arXiv 2405.15362): about a third of ZBV's activations",
)
def v_min(num_ranks: int, num_chunks: int) -> Schedule:
    """V-Min on ``num_ranks`` ranks (2N stages in a V) for ``num_chunks`` micro-batches."""
    return controllable_v(num_ranks, num_chunks, V_MIN, "v-min")
