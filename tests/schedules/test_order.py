"""The global message order: it follows the step's dependencies, and a step that cannot
run to its end is refused."""

from __future__ import annotations

import dataclasses

import pytest

from dualpipe.schedules.generators import generate
from dualpipe.schedules.messages import derive_messages
from dualpipe.schedules.order import message_order


@pytest.mark.parametrize("name,ranks,chunks", [("dualpipe", 4, 8), ("dualpipev", 3, 7),
                                                ("zbv", 4, 6), ("1f1b", 4, 5)])
def test_a_message_comes_after_what_its_sender_needed(name: str, ranks: int,
                                                      chunks: int) -> None:
    plans = derive_messages(generate(name, ranks, chunks))
    order = message_order(plans)
    sent = {m for plan in plans for msgs in plan.sends for m in msgs}
    assert set(order) == sent and sorted(order.values()) == list(range(len(sent)))
    for plan in plans:
        needed: list[int] = []  # positions of every message this rank received so far
        for i in range(len(plan.actions)):
            partner = plan.pair_of[i]
            step = [i] if partner is None else sorted([i, partner])
            if partner is not None and partner < i:
                continue
            needed += [order[m] for j in step for m in plan.recvs[j]]
            for m in (m for j in step for m in plan.sends[j]):
                assert all(order[m] > k for k in needed), (plan.rank, m)


def test_a_step_that_cannot_finish_is_refused() -> None:
    plans = derive_messages(generate("1f1b", 2, 2))
    # rank 0's first forward now also waits for rank 1's first input gradient, which
    # rank 1 sends only after that forward's activation arrived
    grad = next(m for msgs in plans[1].sends for m in msgs if m.grad)
    recvs = [list(r) for r in plans[0].recvs]
    recvs[0].append(grad)
    stuck = [dataclasses.replace(plans[0], recvs=recvs), plans[1]]
    with pytest.raises(ValueError, match="cannot run to its end"):
        message_order(stuck)
