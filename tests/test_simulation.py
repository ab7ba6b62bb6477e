"""The cost simulator against the seed's table and hand-computed timelines.

Costs are multiples of 1/4, so every sum below is exact in binary floating point
and bubbles are compared with ``==``.
"""

from __future__ import annotations

import math

import pytest

from dualpipe.schedules import Action, Op, Overlap, generate
from dualpipe.simulation import (
    Costs,
    peak_activations,
    peak_memory,
    seed_bubble,
    simulate,
    step_duration,
)


def max_bubble(name: str, ranks: int, chunks: int, costs: Costs) -> float:
    return max(simulate(generate(name, ranks, chunks), costs).bubble)


def stages(name: str, ranks: int) -> int:
    """PP of the seed's table: model stages (DualPipeV holds two per rank)."""
    return 2 * ranks if name == "dualpipev" else ranks


# (name, ranks, chunks): PP = 2, 4, 6, 8 for both bidirectional schedules
BIDIRECTIONAL = [
    ("dualpipe", 2, 4),
    ("dualpipe", 2, 10),
    ("dualpipe", 4, 8),
    ("dualpipe", 4, 14),
    ("dualpipe", 6, 12),
    ("dualpipe", 8, 16),
    ("dualpipe", 8, 34),
    ("dualpipev", 1, 2),
    ("dualpipev", 1, 5),
    ("dualpipev", 2, 4),
    ("dualpipev", 2, 9),
    ("dualpipev", 3, 7),
    ("dualpipev", 4, 8),
    ("dualpipev", 4, 17),
]


def pair_range(f: float, b: float) -> list[float | None]:
    """Overlapped-pair times from "perfect overlap" max(f, b) to "none" f + b."""
    return [max(f, b), (max(f, b) + f + b) / 2, None]


# (f, b, w) with f = b - w and w <= f: the regime where the seed's formula is exact
EXACT_COSTS = [(1, 2, 1), (2, 3, 1), (1, 1, 0), (3, 5, 2), (1.5, 2.5, 1), (2, 4, 2)]


@pytest.mark.parametrize(("f", "b", "w"), EXACT_COSTS)
def test_seed_bubble_is_exact_when_forward_equals_input_backward(
    f: float, b: float, w: float
) -> None:
    """The seed's ``(PP/2-1)(F&B + B - 3W)`` is reproduced exactly (max over ranks of
    ``SimResult.bubble``, PP = ranks for DualPipe and 2 x ranks for DualPipeV) when

    * ``comm = 0`` (the table ignores communication: DualPipe hides it in pairs);
    * a forward takes as long as an input-only backward, ``F = B - W``, and the
      weight part is no longer than that, ``W <= B - W`` (i.e. ``W <= F``); the
      zero-bubble paper's ``F = B - W = W`` is the usual instance;
    * the pair time lies between perfect and no overlap, ``max(F, B) <= F&B <= F + B``.

    Why: between adjacent ranks the ramp-up is paced by forwards and the ramp-down
    by input-only backwards; the schedule interleaves the two directions so that
    these waits cancel pairwise only when ``F = B - W``, and the W's that step 3
    (``B*, W, F``) and step 7 (``W, B*``) slide into the gaps fit only when
    ``W <= B - W``. Each of the ``PP/2 - 1`` hops from the middle ranks outwards
    then costs exactly ``F&B + B - 3W``; both 2-stage cases have no bubble.
    See the two tests below for what happens outside this regime.
    """
    for fb in pair_range(f, b):
        costs = Costs(f=f, b=b, w=w, fb=fb)
        for name, ranks, chunks in BIDIRECTIONAL:
            pp = stages(name, ranks)
            assert max_bubble(name, ranks, chunks, costs) == seed_bubble(name, pp, costs), (
                name,
                ranks,
                chunks,
                costs,
            )


def test_seed_bubble_examples() -> None:
    # defaults f=1, b=2, w=1, fb=f+b: (PP/2-1)(3 + 2 - 3) = PP - 2
    for ranks in (2, 4, 8, 16):
        assert max_bubble("dualpipe", ranks, 2 * ranks, Costs()) == ranks - 2
        assert max_bubble("dualpipev", ranks // 2, ranks, Costs()) == ranks - 2
    # overlap that saves half a unit: (8/2-1)(2.5 + 2 - 3) = 4.5, largest on the middle ranks
    result = simulate(generate("dualpipe", 8, 16), Costs(fb=2.5))
    assert result.bubble == [3.5, 4.0, 4.5, 4.5, 4.5, 4.5, 4.0, 3.5]


UPPER_COSTS = [
    (f, i + w, w)
    for f in (0, 0.5, 1, 2)
    for i in (1, 2)  # i = B - W, the input-only backward
    for w in (0, 1, 2)
    if f <= i and w <= i
]


def test_seed_bubble_is_an_upper_bound_when_forward_and_weight_fit_the_input_backward() -> None:
    """With ``F <= B - W`` and ``W <= B - W`` (and ``comm = 0``, ``max(F, B) <= F&B <= F + B``)
    the simulated bubble never exceeds the formula; with ``F < B - W`` it can be below."""
    below = 0
    for f, b, w in UPPER_COSTS:
        for fb in (max(f, b), None):
            costs = Costs(f=f, b=b, w=w, fb=fb)
            for name, ranks, chunks in BIDIRECTIONAL[::2]:
                simulated = max_bubble(name, ranks, chunks, costs)
                formula = seed_bubble(name, stages(name, ranks), costs)
                assert formula is not None
                assert simulated <= formula, (name, ranks, chunks, costs)
                below += simulated < formula
    assert below > 0
    # e.g. F=1, B=3, W=1 on 8 stages: the formula says 3 * (4 + 3 - 3) = 12, the run 11
    assert max_bubble("dualpipe", 8, 16, Costs(f=1, b=3, w=1)) == 11
    assert seed_bubble("dualpipe", 8, Costs(f=1, b=3, w=1)) == 12


EXCEEDING_COSTS = [
    (2, 2, 1),  # F > B - W
    (3, 2, 0.5),
    (3, 2, 0),
    (1, 3, 2),  # W > B - W
    (1, 1, 1),
    (3, 4, 3),  # both
    (0.25, 3, 2.5),  # F < B - W < W: exceeds as well
]


@pytest.mark.parametrize(("f", "b", "w"), EXCEEDING_COSTS)
def test_seed_bubble_is_exceeded_when_forward_or_weight_outgrow_the_input_backward(
    f: float, b: float, w: float
) -> None:
    """With ``F > B - W`` or ``W > B - W`` the simulated bubble exceeds the formula for
    every PP >= 4 (it is 0 = formula for PP = 2). Where ``F >= B - W`` it is exactly

        (PP/2 - 1) * (F&B + B - 3W + (F - (B-W)) + max(0, W - (B-W)))

    i.e. every hop pays the forward's excess over the input-only backward and the
    weight's excess over it. (This law is measured with the simulator over grids
    of costs and sizes; it is not a claim of the seed.)"""
    i = b - w
    for fb in pair_range(f, b):
        costs = Costs(f=f, b=b, w=w, fb=fb)
        for name, ranks, chunks in BIDIRECTIONAL:
            pp = stages(name, ranks)
            simulated = max_bubble(name, ranks, chunks, costs)
            formula = seed_bubble(name, pp, costs)
            assert formula is not None
            if pp == 2:
                assert simulated == formula == 0
                continue
            assert simulated > formula, (name, ranks, chunks, costs)
            if f >= i:
                excess = (f - i) + max(0.0, w - i)
                assert simulated == (pp / 2 - 1) * (costs.pair + b - 3 * w + excess)


def test_seed_bubble_exceeded_examples() -> None:
    # F=2, B=2, W=1 (F > B-W = 1), 8 stages: formula 3 * (4 + 2 - 3) = 9, simulated 12
    assert seed_bubble("dualpipe", 8, Costs(f=2, b=2, w=1)) == 9
    assert max_bubble("dualpipe", 8, 16, Costs(f=2, b=2, w=1)) == 12
    assert max_bubble("dualpipev", 4, 8, Costs(f=2, b=2, w=1)) == 12
    # F=1, B=3, W=2 (W > B-W = 1), 8 stages: formula 3 * (4 + 3 - 6) = 3, simulated 6
    assert seed_bubble("dualpipe", 8, Costs(f=1, b=3, w=2)) == 3
    assert max_bubble("dualpipe", 8, 16, Costs(f=1, b=3, w=2)) == 6


@pytest.mark.parametrize(
    "costs",
    [Costs(), Costs(f=2, b=2, w=1), Costs(f=1, b=3, w=2, fb=3), Costs(f=0.5, b=4, w=1, fb=0)],
)
def test_dualpipev_has_dualpipe_bubbles_on_half_the_ranks(costs: Costs) -> None:
    for ranks in (2, 4, 6):
        for chunks in (ranks, 2 * ranks + 1):
            dual = simulate(generate("dualpipe", ranks, 2 * chunks), costs)
            v = simulate(generate("dualpipev", ranks // 2, chunks + ranks // 2), costs)
            assert max(dual.bubble) == max(v.bubble)


# ---------------------------------------------------------------------- the baselines


@pytest.mark.parametrize(
    ("f", "b", "w"), [(1, 2, 1), (1, 1, 0), (2, 1, 0.5), (0.5, 3, 2), (3, 3, 3)]
)
def test_one_f_one_b_bubble(f: float, b: float, w: float) -> None:
    costs = Costs(f=f, b=b, w=w)
    for ranks in (1, 2, 3, 5, 8):
        for chunks in {1, max(1, ranks - 1), ranks, 2 * ranks + 1}:
            result = simulate(generate("1f1b", ranks, chunks), costs)
            assert max(result.bubble) == (ranks - 1) * (f + b) == seed_bubble("1f1b", ranks, costs)
            assert result.busy == [chunks * (f + b)] * ranks


@pytest.mark.parametrize("w", [0.5, 1, 2])
def test_zb1p_bubble_under_the_zero_bubble_assumption(w: float) -> None:
    """F = B - W = W (the zero-bubble paper's costs): exactly (P-1)(F + B - 2W)."""
    costs = Costs(f=w, b=2 * w, w=w)
    for ranks in (1, 2, 3, 4, 8):
        for chunks in (ranks, ranks + 1, 3 * ranks):
            bubble = max_bubble("zb1p", ranks, chunks, costs)
            assert bubble == (ranks - 1) * (costs.f + costs.b - 2 * w)
            assert bubble == seed_bubble("zb1p", ranks, costs)


def test_zb1p_never_worse_than_one_f_one_b() -> None:
    for f in (0.5, 2):
        for b in (1, 3):
            for w in (0, 1):
                costs = Costs(f=f, b=b, w=w)
                for ranks in (2, 4, 6):
                    for chunks in (2, ranks, 2 * ranks + 1):
                        zb = max_bubble("zb1p", ranks, chunks, costs)
                        assert zb <= max_bubble("1f1b", ranks, chunks, costs)
    # strictly better once W > 0, e.g. F=2, B=2, W=1 on 4 ranks: (P-1)(F+B) = 12
    assert max_bubble("1f1b", 4, 8, Costs(f=2, b=2, w=1)) == 12
    assert max_bubble("zb1p", 4, 8, Costs(f=2, b=2, w=1)) < 12


def test_gpipe_has_no_seed_formula() -> None:
    assert seed_bubble("gpipe", 4, Costs()) is None


# ------------------------------------------------------------------ peak activations


def peaks(name: str, ranks: int, chunks: int) -> list[int]:
    return simulate(generate(name, ranks, chunks), Costs()).peak_activations


@pytest.mark.parametrize("ranks", [2, 4, 6, 8])
def test_dualpipe_peak_activations(ranks: int) -> None:
    """PP + 1 (PP = ranks) on every rank: steps 1-2 make PP live (micro-batch, stage)
    pairs, and the first pair of step 4 starts its forward before its backward frees one."""
    for chunks in (2 * ranks, 2 * ranks + 2, 4 * ranks):
        assert peaks("dualpipe", ranks, chunks) == [ranks + 1] * ranks


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_dualpipev_peak_activations(ranks: int) -> None:
    """``peak_activations`` counts live (micro-batch, stage) pairs, so a micro-batch
    whose forward ran in both phases of a rank counts twice: that is the table's
    "units of one stage's activations". Each DualPipeV rank holds two of the
    PP = 2 x ranks stages and peaks at 2 x ranks + 1 = PP + 1 such units, the
    table's value (the same number of units as DualPipe on PP ranks)."""
    for chunks in (2 * ranks, 2 * ranks + 1, 4 * ranks + 1):
        assert peaks("dualpipev", ranks, chunks) == [2 * ranks + 1] * ranks


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_one_f_one_b_and_zb1p_peak_activations(name: str) -> None:
    for ranks in (1, 2, 4, 8):
        for chunks in (ranks, 3 * ranks):
            # rank r keeps P - r micro-batches live; the maximum is P (rank 0)
            assert peaks(name, ranks, chunks) == [ranks - r for r in range(ranks)]
    assert max(peaks(name, 8, 3)) == 3  # capped by the number of micro-batches


def test_gpipe_peak_activations() -> None:
    for ranks in (1, 3):
        for chunks in (1, 5, 9):
            assert peaks("gpipe", ranks, chunks) == [chunks] * ranks


def test_peak_counts_a_pair_forward_before_its_backward() -> None:
    schedule = generate("dualpipev", 1, 2)  # F0.0 F1.0 F0.1 B1.0 F1.1+B0.0 ...
    assert peak_activations(schedule, 0) == 3


# ---------------------------------------------------------------- communication, costs


def test_two_rank_one_f_one_b_timeline_with_comm() -> None:
    """Hand-computed: f=1, b=2, comm=0.5 on 2 ranks, 2 micro-batches.

    rank 0: F0.0 [0, 1]     F0.1 [1, 2]     B0.0 [5, 7]      B0.1 [8, 10]
    rank 1: F0.0 [1.5, 2.5] B0.0 [2.5, 4.5] F0.1 [4.5, 5.5]  B0.1 [5.5, 7.5]

    (rank 1's B0.0 is the loss step; rank 0's B0.0 waits for 4.5 + 0.5.) The makespan
    3f + 3b + 2 comm = 10 exceeds the comm-free 3f + 3b = 9.
    """
    result = simulate(generate("1f1b", 2, 2), Costs(f=1, b=2, w=1, comm=0.5))
    spans = [[(str(t.step), t.start, t.end) for t in row] for row in result.timeline]
    assert spans == [
        [("F0.0", 0, 1), ("F0.1", 1, 2), ("B0.0", 5, 7), ("B0.1", 8, 10)],
        [("F0.0", 1.5, 2.5), ("B0.0", 2.5, 4.5), ("F0.1", 4.5, 5.5), ("B0.1", 5.5, 7.5)],
    ]
    assert result.makespan == 10
    assert result.busy == [6, 6]
    assert result.bubble == [4, 4]
    assert simulate(generate("1f1b", 2, 2), Costs(f=1, b=2, w=1)).makespan == 9


@pytest.mark.parametrize("comm", [0, 0.25, 1.5])
def test_forward_chain_timing(comm: float) -> None:
    """GPipe's forwards: micro-batch m starts on rank r at r(f + comm) + m f."""
    f = 0.75
    result = simulate(generate("gpipe", 4, 5), Costs(f=f, b=1, w=0, comm=comm))
    for r, row in enumerate(result.timeline):
        forwards = [t for t in row if isinstance(t.step, Action) and t.step.op is Op.FORWARD]
        assert [t.start for t in forwards] == [r * (f + comm) + m * f for m in range(5)]
        assert [t.end - t.start for t in forwards] == [f] * 5


@pytest.mark.parametrize(
    ("name", "ranks", "chunks"),
    [("dualpipe", 4, 8), ("dualpipev", 2, 5), ("1f1b", 3, 6), ("zb1p", 3, 6), ("gpipe", 3, 4)],
)
def test_makespan_grows_with_comm(name: str, ranks: int, chunks: int) -> None:
    schedule = generate(name, ranks, chunks)
    spans = [simulate(schedule, Costs(comm=c)).makespan for c in (0, 0.25, 1, 4)]
    assert spans == sorted(spans) and len(set(spans)) == 4
    # communication never changes the work, only the waiting
    busy = {tuple(simulate(schedule, Costs(comm=c)).busy) for c in (0, 0.25, 1, 4)}
    assert len(busy) == 1


def test_one_rank_needs_no_communication() -> None:
    schedule = generate("dualpipev", 1, 4)
    assert simulate(schedule, Costs(comm=5)).makespan == simulate(schedule, Costs()).makespan


def test_step_durations() -> None:
    costs = Costs(f=1, b=3, w=1.25, fb=3.5)
    fwd, full = Action(Op.FORWARD, 0, 0), Action(Op.BACKWARD, 1, 0)
    inp, wgt = Action(Op.INPUT, 1, 0), Action(Op.WEIGHT, 1, 0)
    assert step_duration(fwd, costs) == 1
    assert step_duration(full, costs) == 3
    assert step_duration(inp, costs) == 1.75
    assert step_duration(wgt, costs) == 1.25
    assert step_duration(Overlap(fwd, full), costs) == 3.5
    assert step_duration(Overlap(fwd, inp), costs) == 2.25
    assert Costs(f=1, b=2).pair == 3 and costs.pair == 3.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"f": -1},
        {"b": -0.5, "w": -1},
        {"w": -1},
        {"comm": -0.25},
        {"fb": -1},
        {"f": math.nan},
        {"comm": math.nan},
    ],
)
def test_negative_costs_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        Costs(**kwargs)


def test_weight_cannot_exceed_backward() -> None:
    with pytest.raises(ValueError, match=r"cost w \(3\) cannot exceed the full backward b \(2\)"):
        Costs(f=1, b=2, w=3)
    assert Costs(f=1, b=2, w=2).w == 2  # equal is fine (input-only backward takes 0)


def test_result_summary() -> None:
    result = simulate(generate("dualpipe", 4, 8), Costs())
    data = result.to_dict()
    assert data["schedule"] == "dualpipe" and data["num_ranks"] == 4 and data["num_chunks"] == 8
    assert data["makespan"] == result.makespan
    assert [b + u for b, u in zip(result.bubble, result.busy, strict=True)] == [result.makespan] * 4


# ------------------------------------------------------------------ peak memory
# (deferred weight-gradient state counted: an I frees its activation but keeps
# ``w_memory`` until its W)


def test_peak_memory_of_dualpipev_by_hand() -> None:
    """DualPipeV, 2 ranks, 4 micro-batches. Rank 0 runs ``F0.0 F0.1 F0.2 F1.0 I1.0 W1.0
    ...`` (4 live, then ``I1.0`` leaves 3 + d) and ends ``I0.2 W0.2 I0.3 W0.3``; rank 1
    peaks at 5 live in the warm-up and ends ``B0.2 I1.3 I0.3 W1.3 W0.3`` (2 live, then
    ``1 + d``, then ``2d``). So with d = 3: rank 0 ``3 + 3 = 6``, rank 1 ``max(5, 6) = 6``;
    with d <= 1 both stay at the activation peak 5; with d = 0 the peak is
    ``peak_activations``."""
    s = generate("dualpipev", 2, 4)
    assert [peak_memory(s, r, 3.0) for r in range(2)] == [6.0, 6.0]
    assert [peak_memory(s, r, 1.0) for r in range(2)] == [5.0, 5.0]
    assert [peak_memory(s, r, 0.0) for r in range(2)] == [peak_activations(s, r) for r in (0, 1)]
    # 2.5: rank 0 3 + 2.5 = 5.5; rank 1 2 x 2.5 = 5
    assert [peak_memory(s, r, 2.5) for r in range(2)] == [5.5, 5.0]


def test_peak_memory_of_zbv_by_hand() -> None:
    """ZBV, 2 ranks, 4 micro-batches. Rank 1 ends ``I0.2 I1.3 I0.3 W0.2 W1.3 W0.3`` with
    3 live: ``2 + d``, ``1 + 2d``, ``3d``; earlier every I is followed by its W with 4 live
    before it (``3 + d``). Rank 0 never has two deferred: ``3 + d`` after ``F1.0 I1.0``.
    So d = 3 gives rank 0 6 and rank 1 9; d = 1.5 gives 4.5 on both."""
    s = generate("zbv", 2, 4)
    assert [peak_memory(s, r, 3.0) for r in range(2)] == [6.0, 9.0]
    assert [peak_memory(s, r, 1.5) for r in range(2)] == [4.5, 4.5]
    # per stage: rank 1 holds stages 1 and 2; state only for stage 2 (phase 1): its tail
    # I1.3 keeps 3 with 1 live: 1 + 3 = 4 ... and the steady state I1.k: 3 + 3 = 6
    assert peak_memory(s, 1, (0.0, 0.0, 3.0, 0.0)) == 6.0
    # ZBV on 4 ranks at 1.5 per deferred W: the last rank 10.5 (measured so before this
    # model counted it; the activation-only metric says 8)
    big = simulate(generate("zbv", 4, 8), Costs(w_memory=1.5))
    assert big.peak_activations == [8, 8, 8, 8]
    assert big.peak_memory == [8.5, 8.5, 8.5, 10.5]


def test_peak_memory_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="w_memory"):
        Costs(w_memory=-1.0)
    with pytest.raises(ValueError, match="stage 3 has none"):
        peak_memory(generate("zbv", 2, 4), 0, (1.0, 1.0))
