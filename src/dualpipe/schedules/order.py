"""One global order of a step's messages that every rank issues its operations in."""

from __future__ import annotations

from collections.abc import Sequence

from .messages import Message, RankMessages

__all__ = ["message_order"]


def _steps(plan: RankMessages) -> list[list[int]]:
    """The rank's action indices grouped into steps (an overlapped pair is one step)."""
    steps: list[list[int]] = []
    for i in range(len(plan.actions)):
        partner = plan.pair_of[i]
        if partner is not None and partner < i:
            continue
        steps.append([i] if partner is None else [i, partner])
    return steps


def message_order(plans: Sequence[RankMessages]) -> dict[Message, int]:
    """Every message of the step (from :func:`~dualpipe.schedules.messages.derive_messages`)
    numbered in one order that follows the step's dependencies.

    Raises:
        ValueError: if the ranks' lists cannot all run (a message is needed that is
            never sent before it is needed: the schedule deadlocks).
    """
    steps = [_steps(plan) for plan in plans]
    cursor = [0] * len(plans)
    sent: set[Message] = set()
    order: list[Message] = []
    while any(cursor[r] < len(steps[r]) for r in range(len(plans))):
        new: list[Message] = []
        ran = False
        for plan, rank_steps in zip(plans, steps, strict=True):
            r = plan.rank
            if cursor[r] == len(rank_steps):
                continue
            step = rank_steps[cursor[r]]
            if all(m in sent for i in step for m in plan.recvs[i]):
                cursor[r] += 1
                ran = True
                new.extend(m for i in sorted(step) for m in plan.sends[i])
        if not ran:
            stuck = {plan.rank: [str(plan.actions[i]) for i in steps[r][cursor[r]]]
                     for r, plan in enumerate(plans) if cursor[r] < len(steps[r])}
            raise ValueError(f"the step cannot run to its end: ranks stuck at {stuck}")
        order.extend(new)
        sent.update(new)
    return {m: k for k, m in enumerate(order)}
