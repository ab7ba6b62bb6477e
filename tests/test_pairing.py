"""Pairs of two forwards or two backwards: made where faster, validated, simulated."""

from __future__ import annotations

import pytest

from dualpipe import Costs, generate, simulate
from dualpipe.errors import ScheduleError
from dualpipe.pairing import NOMINAL_PARTS, pair_steps
from dualpipe.partcosts import PartCosts, interleave
from dualpipe.schedules import Action, Op, Overlap, PairKind, Schedule, validate
from dualpipe.schedules.validate import problems as find_problems

MOE = PartCosts((4.0, 4.0, 0.0), (4.0, 4.0), (4.0, 4.0, 0.0), (4.0, 4.0, 0.0), (4.0, 4.0))


def _kinds(schedule: Schedule) -> set[PairKind]:
    return {s.kind for row in schedule.steps for s in row if isinstance(s, Overlap)}


@pytest.mark.parametrize("name", ["dualpipev", "dualpipe"])
@pytest.mark.parametrize(("ranks", "chunks"),
                         [(2, 2), (2, 13), (4, 5), (4, 20), (6, 8), (8, 13), (8, 32)])
def test_paired_schedules_are_valid_and_faster(name: str, ranks: int, chunks: int) -> None:
    chunks += chunks % 2 if name == "dualpipe" else 0  # DualPipe: as many in each direction
    base = generate(name, ranks, chunks)
    for parts in (NOMINAL_PARTS, MOE):
        paired = pair_steps(base, parts)
        validate(paired)  # raises on any problem (deadlock, dependent halves, ...)
        costs = Costs(parts=parts)
        before, after = simulate(base, costs).makespan, simulate(paired, costs).makespan
        assert after <= before
        if paired is not base:
            assert after < before and _kinds(paired) & {PairKind.FF, PairKind.BB}
            # the same actions on every rank, in the same order but for moved Ws
            for rank in range(ranks):
                a = [x for x in base.actions(rank) if x.op is not Op.WEIGHT]
                b = [x for x in paired.actions(rank) if x.op is not Op.WEIGHT]
                assert a == b


def test_dualpipev_warm_up_pairs_forwards() -> None:
    paired = pair_steps(generate("dualpipev", 2, 10), MOE)
    assert PairKind.FF in _kinds(paired)
    assert str(paired.steps[0][1]) == "F0.1+F0.2"
    assert simulate(paired, Costs(parts=MOE)).makespan < simulate(
        generate("dualpipev", 2, 10), Costs(parts=MOE)).makespan


def test_no_communication_no_pairs() -> None:
    # nothing to hide: a pair is no faster than its halves, so nothing changes
    flat = PartCosts((1.0, 1.0), (0.0,), (1.0, 1.0), (1.0, 1.0), (0.0,))
    base = generate("dualpipev", 4, 8)
    assert pair_steps(base, flat) is base


def test_dependent_halves_are_refused() -> None:
    base = generate("dualpipev", 2, 4)
    # rank 1 holds stages 1 and 2: F1.0 needs F0.0 of the same rank
    row = list(base.steps[1])
    assert [str(s) for s in row[:2]] == ["F0.0", "F1.0"]
    bad = Schedule(base.name, base.layout, base.chunks_per_stream,
                   (base.steps[0], (Overlap(row[0], row[1]), *row[2:])))
    problems = find_problems(bad)
    assert any("needs the other's result" in p for p in problems), problems
    with pytest.raises(ScheduleError):
        validate(bad)


def test_only_allowed_kinds() -> None:
    base = generate("dualpipev", 2, 10)
    only_ff = pair_steps(base, MOE, kinds=[PairKind.FF])
    assert _kinds(only_ff) <= {PairKind.FB, PairKind.FF}


def test_interleaved_forwards_hide_their_communication() -> None:
    one = max(iv.end for iv in interleave(MOE, ("F",)))
    two = max(iv.end for iv in interleave(MOE, ("F", "F")))
    assert one == MOE.forward == 16.0
    assert two < 2 * one  # one forward's compute under the other's all-to-all
    backs = max(iv.end for iv in interleave(MOE, ("I", "I")))
    assert backs < 2 * (MOE.backward - MOE.weight)


def test_pending_weight_work_fills_waits_and_leaves_the_pool() -> None:
    from dualpipe.partcosts import WeightItem

    pool = [WeightItem((0, 0), 4.0), WeightItem((0, 0), 4.0)]
    alone = max(iv.end for iv in interleave(MOE, ("F",)))
    filled = interleave(MOE, ("F",), pool)
    # the forward waits twice for 4 ms: both items run in those waits, for free
    assert max(iv.end for iv in filled) == alone
    assert pool == [] and [iv.label for iv in filled].count("W*") == 2
    # an I's own weight work stays in the pool for its W (what did not fill a wait)
    pool2: list[WeightItem] = []
    interleave(MOE, ("I",), pool2, owners=((1, 3),))
    assert sum(it.time for it in pool2) <= MOE.weight
    assert all(it.owner == (1, 3) for it in pool2)


def test_simulated_w_runs_what_is_left() -> None:
    # W steps cost what the waits before them did not absorb
    s = generate("dualpipev", 2, 6)
    res = simulate(s, Costs(parts=MOE))
    ws = [t for row in res.timeline for t in row
          if isinstance(t.step, Action) and t.step.op is Op.WEIGHT]
    assert ws and all(0.0 <= t.end - t.start <= MOE.weight for t in ws)
