"""ZBV: hand-derived orders, PyTorch's generator op for op, and the simulated claims."""

from __future__ import annotations

import pytest

from dualpipe.schedules import dualpipev_layout, from_torch_actions, generate, validate, zbv
from dualpipe.simulation import Costs, simulate

from .torch_orders import zbv_rows


def rows(name: str, ranks: int, chunks: int) -> list[str]:
    return [" ".join(str(s) for s in steps) for steps in generate(name, ranks, chunks).steps]


# N = 2, M = 3 (m = max(M, 2N-1) = 3), read off the rules in dualpipe.schedules.zbv:
# rank 0: 3 F(0); no F(1)F(0); 2x F(1) I(1) W(1); loop once (phase 0 already has 3):
#   I(0) W(0) F(1) I(1) W(1); no I(0)I(1); 2x I(0) W(0); nothing left.
# rank 1: 1 F(0); F(1) F(0); F(1) I(1) W(1); loop once: F(0) I(0) W(0) F(1) I(1) W(1);
#   I(0) I(1); I(0) W(0); W's left: phase 1 (1.2) then phase 0 (0.2).
ZBV_2_3 = [
    "F0.0 F0.1 F0.2 F1.0 I1.0 W1.0 F1.1 I1.1 W1.1 I0.0 W0.0 F1.2 I1.2 W1.2 I0.1 W0.1 I0.2 W0.2",
    "F0.0 F1.0 F0.1 F1.1 I1.0 W1.0 F0.2 I0.0 W0.0 F1.2 I1.1 W1.1 I0.1 I1.2 I0.2 W0.1 W1.2 W0.2",
]
# N = 1, M = 2: F(0); F(1) I(1) W(1); loop: F(0) I(0) W(0) F(1) I(1) W(1); I(0) W(0).
ZBV_1_2 = ["F0.0 F1.0 I1.0 W1.0 F0.1 I0.0 W0.0 F1.1 I1.1 W1.1 I0.1 W0.1"]
# N = 2, M = 1: the M = 3 lists without micro-batches 1 and 2.
ZBV_2_1 = ["F0.0 F1.0 I1.0 W1.0 I0.0 W0.0", "F0.0 F1.0 I1.0 W1.0 I0.0 W0.0"]


@pytest.mark.parametrize(
    ("ranks", "chunks", "expected"), [(2, 3, ZBV_2_3), (1, 2, ZBV_1_2), (2, 1, ZBV_2_1)]
)
def test_hand_derived(ranks: int, chunks: int, expected: list[str]) -> None:
    assert rows("zbv", ranks, chunks) == expected


@pytest.mark.parametrize("ranks", range(1, 9))
def test_equals_pytorch_generator(ranks: int) -> None:
    for chunks in range(1, 4 * ranks + 3):
        theirs = from_torch_actions(zbv_rows(ranks, chunks), dualpipev_layout(ranks), chunks)
        ours = zbv(ranks, chunks)
        assert ours.steps == theirs.steps, (ranks, chunks)
        validate(ours)


def test_issue_numbers_against_dualpipev() -> None:
    # F = I = W = 1 (b = 2, w = 1), no overlap, 4 ranks, 8 micro-batches
    costs = Costs(f=1, b=2, w=1)
    z = simulate(zbv(4, 8), costs)
    d = simulate(generate("dualpipev", 4, 8), costs)
    assert (z.makespan, max(z.bubble), max(z.peak_activations)) == (51, 3, 8)
    assert (d.makespan, max(d.bubble), max(d.peak_activations)) == (54, 6, 9)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_zero_bubble_steady_state_and_2n_activations(ranks: int) -> None:
    # With F = I = W every rank idles only in the warm-up/cool-down: the bubble does
    # not grow with the number of micro-batches, and peak memory is 2N stage units.
    costs = Costs(f=1, b=2, w=1)
    bubbles = {max(simulate(zbv(ranks, m), costs).bubble) for m in (2 * ranks, 4 * ranks, 64)}
    assert len(bubbles) == 1
    assert max(simulate(zbv(ranks, 64), costs).peak_activations) == 2 * ranks
