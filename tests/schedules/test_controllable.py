"""V-Half and V-Min: hand-derived orders, and the paper's memory and bubble claims
(arXiv 2405.15362) reproduced by the simulator."""

from __future__ import annotations

import pytest

from dualpipe.schedules import generate, v_half, v_min, validate, zbv
from dualpipe.schedules.controllable import V_HALF, V_MIN, building_block
from dualpipe.simulation import Costs, simulate

EQUAL = Costs(f=1, b=2, w=1)  # F = I = W: the paper's ideal setting


def rows(name: str, ranks: int, chunks: int) -> list[str]:
    return [" ".join(str(s) for s in steps) for steps in generate(name, ranks, chunks).steps]


def test_v_min_one_rank() -> None:
    # block F(0)@0 F(1)@1 I(1)@2 I(0)@3, repeated every 6 slots; slots 4, 5 take the W's
    assert rows("v-min", 1, 2) == ["F0.0 F1.0 I1.0 I0.0 W1.0 W0.0 F0.1 F1.1 I1.1 I0.1 W1.1 W0.1"]


def test_v_half_two_ranks() -> None:
    # Block (two slots per hop down, backward turn 2): F(0) at 0 / 2, F(1) at 4 / 3,
    # then I(1) at 5 / 7 and I(0) at 10 / 9 clash modulo 6 with the forwards until the
    # gap is 3: I(1) at 8 / 10, I(0) at 13 / 12. Micro-batch 1 is 6 slots later; a W
    # takes the first free slot after its I.
    assert building_block(2, V_HALF) == [(0, 4, 8, 13), (2, 3, 10, 12)]
    assert rows("v-half", 2, 2) == [
        "F0.0 F1.0 F0.1 I1.0 W1.0 F1.1 I0.0 I1.1 W0.0 W1.1 I0.1 W0.1",
        "F0.0 F1.0 F0.1 F1.1 I1.0 W1.0 I0.0 W0.0 I1.1 W1.1 I0.1 W0.1",
    ]


@pytest.mark.parametrize("ranks", range(1, 17))
def test_gap_is_the_papers_interval(ranks: int) -> None:
    # the paper's stable patterns wait 2 slots before the backwards for V-Min when N is
    # a multiple of 3, and 3 slots for V-Half when N is even; we search the least gap
    base_min = building_block(ranks, V_MIN)[0]
    assert base_min[2] - base_min[1] - 1 == (2 if ranks % 3 == 0 else 0)
    base_half = building_block(ranks, V_HALF)[0]
    assert base_half[2] - base_half[1] - 1 == (3 if ranks % 2 == 0 else 0)


@pytest.mark.parametrize("ranks", range(2, 13))
def test_memory_half_and_third_of_zbv(ranks: int) -> None:
    """The paper: V-Half (p+2)//2 and V-Min (p+4)//3 micro-batches of one rank's
    activations (two stages), ZBV p. In stage units: 2((N+2)//2), 2((N+4)//3), 2N.
    V-Half meets its figure exactly; V-Min at most (we count an activation until its
    input-only backward, the paper until its W)."""
    chunks = 4 * ranks
    peak = {name: max(simulate(generate(name, ranks, chunks), EQUAL).peak_activations)
            for name in ("zbv", "v-half", "v-min")}
    assert peak["zbv"] == 2 * ranks
    assert peak["v-half"] == 2 * ((ranks + 2) // 2)
    assert peak["v-min"] <= 2 * ((ranks + 4) // 3)
    assert peak["v-min"] <= peak["v-half"] <= peak["zbv"]


def test_memory_ratios_at_twelve_ranks() -> None:
    peaks = [max(simulate(fn(12, 48), EQUAL).peak_activations) for fn in (zbv, v_half, v_min)]
    assert peaks == [24, 14, 10]  # 1 : 0.58 : 0.42, tending to 1/2 and 1/3 as N grows


def _bubbles(name: str, ranks: int, costs: Costs) -> list[float]:
    return [max(simulate(generate(name, ranks, m), costs).bubble) for m in (4 * ranks, 8 * ranks)]


@pytest.mark.parametrize("ranks", [2, 3, 4, 6])
def test_no_steady_state_bubble_when_f_i_w_are_equal(ranks: int) -> None:
    for name in ("v-half", "v-min"):
        first, second = _bubbles(name, ranks, EQUAL)
        assert first == second  # twice the micro-batches, no more idle time


@pytest.mark.parametrize(
    ("f", "i", "w", "holds"),
    [
        (1, 1.5, 1, True),
        (1.5, 1, 1, True),
        (1, 1.2, 0.6, True),
        (1, 1, 2, True),
        (1, 2, 1, False),  # W + 2F < 2B
        (2, 1, 1, False),  # W + 2B < 2F
        (1, 2, 0.5, False),
    ],
)
def test_v_half_zero_bubble_condition(f: float, i: float, w: float, holds: bool) -> None:
    """The paper: V-Half has no steady-state bubble when W + 2B >= 2F and W + 2F >= 2B
    (B: input-only backward); V-Min only when F = B."""
    costs = Costs(f=f, b=i + w, w=w)
    assert ((w + 2 * i >= 2 * f) and (w + 2 * f >= 2 * i)) == holds
    first, second = _bubbles("v-half", 4, costs)
    assert (first == pytest.approx(second)) == holds
    first, second = _bubbles("v-min", 4, costs)
    assert (first == pytest.approx(second)) == (f == i)


def test_few_micro_batches() -> None:
    for ranks in range(1, 7):
        for chunks in range(1, 2 * ranks + 1):
            validate(v_half(ranks, chunks))
            validate(v_min(ranks, chunks))
