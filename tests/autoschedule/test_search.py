"""The auto-scheduler's search: valid, within the memory limit, never slower than its seeds,
optimal where the optimum is known."""

from __future__ import annotations

import pytest

from dualpipe.autoschedule import activation_limit, autoschedule, deferred_peak, search
from dualpipe.autoschedule.listing import list_schedule
from dualpipe.autoschedule.search import ONE_F_ONE_B
from dualpipe.schedules import dualpipe_layout, dualpipev_layout, validate
from dualpipe.simulation import Costs, peak_memory, simulate

COSTS = [
    Costs(f=1, b=2, w=1),  # F = I = W, no overlap gain
    Costs(f=1, b=2, w=1, fb=2.2, comm=0.2),  # overlapped pairs, messages cost
    Costs(f=2, b=4, w=1, comm=0.1),
    Costs(f=1, b=3, w=2, fb=3.3, comm=0.05),
]


def _check(found, costs: Costs, limit: int) -> None:  # type: ignore[no-untyped-def]
    validate(found.schedule)
    result = simulate(found.schedule, costs)
    assert result.makespan == pytest.approx(found.makespan)
    assert max(result.peak_activations) == found.peak <= limit
    for name, makespan in found.seeds.items():
        if makespan is not None:
            assert found.makespan <= makespan + 1e-9, (name, makespan, found.makespan)


@pytest.mark.parametrize("costs", COSTS, ids=["plain", "overlap+comm", "slow-f", "big-w"])
@pytest.mark.parametrize(
    "ranks,chunks", [(1, 2), (2, 1), (2, 4), (2, 7), (3, 2), (3, 6), (4, 5), (4, 8), (4, 11)]
)
def test_v_layout_valid_within_limit_and_never_slower_than_seeds(
    ranks: int, chunks: int, costs: Costs
) -> None:
    found = search(ranks, chunks, costs)
    limit = activation_limit(dualpipev_layout(ranks))
    assert found.limit == limit == 2 * ranks + 1
    _check(found, costs, limit)
    assert found.seeds["dualpipev"] is not None  # DualPipeV exists for any micro-batch count
    assert found.seeds["zbv"] is not None
    one_f_one_b = list_schedule(dualpipev_layout(ranks), chunks, costs, limit, ONE_F_ONE_B)
    assert one_f_one_b is not None
    assert found.makespan <= one_f_one_b[1] + 1e-9


@pytest.mark.parametrize("costs", COSTS[:2], ids=["plain", "overlap+comm"])
@pytest.mark.parametrize("ranks,chunks", [(2, 4), (4, 8), (4, 14)])
def test_dualpipe_layout(ranks: int, chunks: int, costs: Costs) -> None:
    found = search(ranks, chunks, costs, layout="dualpipe")
    assert found.schedule.layout == dualpipe_layout(ranks)
    assert found.limit == ranks + 1
    assert found.seeds["dualpipe"] is not None
    _check(found, costs, found.limit)


@pytest.mark.parametrize("limit", [2, 3, 4, 5, 6, 7])
def test_any_limit_is_respected(limit: int) -> None:
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.1)
    found = search(3, 9, costs, limit=limit)
    _check(found, costs, limit)
    # DualPipeV needs PP + 1 = 7 activations per rank: below that it is no candidate
    assert (found.seeds["dualpipev"] is None) == (limit < 7)


@pytest.mark.parametrize("max_deferred", [0, 1, 3])
def test_deferred_weight_gradients_bounded(max_deferred: int) -> None:
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.2)
    found = search(4, 8, costs, max_deferred=max_deferred)
    _check(found, costs, 9)
    assert found.deferred == deferred_peak(found.schedule) <= max_deferred
    # ZBV keeps up to 2N - 1 = 7 deferred: it is no candidate under these bounds
    assert found.seeds["zbv"] is None
    unbounded = search(4, 8, costs)
    assert unbounded.deferred > 3
    assert unbounded.makespan <= found.makespan + 1e-9


def test_small_exact_cases() -> None:
    # One rank holding both stages, two micro-batches, pairs save 0.8: the first two
    # forwards can pair with nothing (no backward exists before F1.0 ends), so at most two
    # of the four backwards pair; the optimum is 2 f + 2 fb + 2 b = 10.4.
    found = search(1, 2, Costs(f=1, b=2, w=1, fb=2.2))
    assert found.makespan == pytest.approx(10.4)
    # Two ranks, F = I = W = 1, no overlap, no comm: rank 1 cannot start before t = 1
    # and has 4 x 2 x 3 = 24 of work, so 25 is optimal (DualPipeV: 26).
    found = search(2, 4, Costs(f=1, b=2, w=1))
    assert found.makespan == pytest.approx(25.0)
    assert found.seeds["dualpipev"] == pytest.approx(26.0)


def test_autoschedule_returns_the_schedule() -> None:
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.2)
    schedule = autoschedule(2, 5, costs)
    assert schedule.name == "auto"
    assert schedule.to_text() == search(2, 5, costs).schedule.to_text()  # deterministic


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layout": "ring"}, "unknown layout"),
        ({"limit": 1}, "memory limit >= 2"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        search(2, 4, Costs(), **kwargs)  # type: ignore[arg-type]


def test_dualpipe_layout_needs_even_chunks() -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        search(2, 5, Costs(), layout="dualpipe")


def test_memory_limit_counts_deferred_weight_state() -> None:
    """The limit is peak memory: activations plus ``w_memory`` per deferred W. A search
    that treats deferred state as free (``w_memory=0``) keeps many W's pending (16 per
    rank on 4 x 12), over the limit once each holds 1.5 activations; with the state
    counted every result fits the limit by the simulator's own measure."""
    base = dict(f=1, b=2, w=1, fb=2.2, comm=0.05)
    free = search(4, 12, Costs(**base, w_memory=0.0))
    assert free.deferred == 16
    assert max(peak_memory(free.schedule, r, 1.5) for r in range(4)) > free.limit
    for w_memory in (0.0, 1.0, 1.5, (1.0,) * 7 + (2.0,)):
        found = search(4, 12, Costs(**base, w_memory=w_memory))
        memory = [peak_memory(found.schedule, r, w_memory) for r in range(4)]
        assert found.memory == max(memory) <= found.limit == 9, w_memory
        assert simulate(found.schedule, Costs(**base, w_memory=w_memory)).peak_memory == memory
    assert search(4, 12, Costs(**base, w_memory=1.5)).deferred < free.deferred


def test_part_costs_pair_the_best_schedule() -> None:
    from dualpipe.partcosts import PartCosts
    from dualpipe.schedules import Overlap, PairKind

    parts = PartCosts((4.0, 4.0, 0.0), (4.0, 4.0), (4.0, 4.0, 0.0), (4.0, 4.0, 0.0), (4.0, 4.0))
    costs = Costs(parts=parts)
    paired = search(2, 10, costs)
    plain = search(2, 10, costs, pairs=False)
    kinds = {s.kind for row in paired.schedule.steps for s in row if isinstance(s, Overlap)}
    assert kinds & {PairKind.FF, PairKind.BB} and "pairs" in paired.origin
    assert paired.makespan < plain.makespan
    assert paired.memory <= paired.limit
    validate(paired.schedule)
