"""List scheduling: every policy builds a valid schedule within the limit whose simulated
makespan is the one the scheduler computed; a template keeps its order and memory."""

from __future__ import annotations

import itertools

import pytest

from dualpipe.autoschedule import Policy, list_schedule
from dualpipe.schedules import (
    Op,
    Overlap,
    Schedule,
    dualpipe_layout,
    dualpipev_layout,
    generate,
    validate,
)
from dualpipe.simulation import Costs, peak_activations, simulate

POLICIES = [
    Policy(*knobs)
    for knobs in itertools.product(
        (True, False),
        (True, False),
        (True, False),
        (True, False),
        (True, False),
        (0.0, 1.0),
        (0.0, 1.0),
        (0, 2),
    )
][::7]
"""Every seventh combination of the knobs (37 policies, each knob value several times)."""


@pytest.mark.parametrize(
    "layout,chunks",
    [
        (dualpipev_layout(1), 3),
        (dualpipev_layout(3), 5),
        (dualpipev_layout(4), 9),
        (dualpipe_layout(4), 4),
    ],
    ids=["v1", "v3", "v4", "dualpipe4"],
)
def test_every_policy_valid_and_makespan_is_the_simulators(layout, chunks) -> None:  # type: ignore[no-untyped-def]
    costs = Costs(f=1, b=2.5, w=1, fb=2.4, comm=0.15)
    limit = layout.num_stages + 1
    built = 0
    for policy in POLICIES:
        res = list_schedule(layout, chunks, costs, limit, policy)
        if res is None:
            continue
        schedule, makespan = res
        validate(schedule)
        result = simulate(schedule, costs)
        assert result.makespan == pytest.approx(makespan), policy
        assert max(result.peak_activations) <= limit, policy
        if not policy.split:
            assert all(
                a.op is not Op.INPUT for r in range(layout.num_ranks) for a in schedule.actions(r)
            )
        built += 1
    assert built == len(POLICIES)  # the memory rules make stalls impossible


@pytest.mark.parametrize(
    "layout,limit",
    [(dualpipev_layout(4), k) for k in (2, 3, 5, 8, 9)]
    + [(dualpipe_layout(4), k) for k in (2, 3, 5)],
)
def test_never_stalls_at_any_limit(layout, limit: int) -> None:  # type: ignore[no-untyped-def]
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.3)
    for policy in POLICIES:
        res = list_schedule(layout, 4, costs, limit, policy)
        assert res is not None, policy
        validate(res[0])
        assert max(peak_activations(res[0], r) for r in range(4)) <= limit


def _non_weight(schedule: Schedule, rank: int) -> list[str]:
    """The rank's steps without W's, input-only backwards written as full ones."""
    out = []
    for step in schedule.steps[rank]:
        if isinstance(step, Overlap) or step.op is not Op.WEIGHT:
            out.append(str(step).replace("I", "B"))
    return out


@pytest.mark.parametrize("name", ["dualpipev", "dualpipe"])
def test_template_keeps_order_and_memory(name: str) -> None:
    template = generate(name, 4, 8)
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.2)
    res = list_schedule(
        template.layout, template.chunks_per_stream, costs, 99, Policy(w_gap=0.5), template
    )
    assert res is not None
    schedule, makespan = res
    validate(schedule)
    assert simulate(schedule, costs).makespan == pytest.approx(makespan)
    for r in range(4):
        assert _non_weight(schedule, r) == _non_weight(template, r)
        assert peak_activations(schedule, r) == peak_activations(template, r)
    # with the weight gradients free to fill waits, DualPipeV's messages hide better
    assert makespan < simulate(template, costs).makespan


def test_template_pairs_are_split_when_pairing_saves_nothing() -> None:
    template = generate("dualpipev", 4, 10)
    costs = Costs(f=1, b=2, w=1, comm=0.2)  # fb = f + b
    res = list_schedule(template.layout, 10, costs, 9, Policy(), template)
    assert res is not None
    schedule, makespan = res
    validate(schedule)
    assert not any(isinstance(s, Overlap) for row in schedule.steps for s in row)
    paired = Costs(f=1, b=2, w=1, fb=2.99, comm=0.2)  # pairs kept: they save 0.01
    kept = list_schedule(template.layout, 10, paired, 9, Policy(), template)
    assert kept is not None
    assert any(isinstance(s, Overlap) for row in kept[0].steps for s in row)
    for r in range(4):
        assert peak_activations(schedule, r) == peak_activations(template, r)


def test_template_out_of_order_is_refused() -> None:
    text = "rank 0: F0.1 F0.0 F1.0 F1.1 B1.0 B0.0 B1.1 B0.1"
    template = Schedule.from_text(text, dualpipev_layout(1))
    validate(template)
    with pytest.raises(ValueError, match="out of micro-batch order"):
        list_schedule(template.layout, 2, Costs(), 3, Policy(), template)
