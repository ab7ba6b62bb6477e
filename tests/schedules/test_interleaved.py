"""Interleaved 1F1B: hand-derived orders and PyTorch's generator op for op."""

from __future__ import annotations

import pytest

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    from_torch_actions,
    generate,
    interleaved_1f1b,
    interleaved_layout,
    validate,
)

from .torch_orders import interleaved_rows


def rows(ranks: int, chunks: int, v: int = 2) -> list[str]:
    return [" ".join(str(s) for s in steps) for steps in interleaved_1f1b(ranks, chunks, v).steps]


def test_layout_loops() -> None:
    layout = interleaved_layout(3, 2)
    assert layout.paths == (((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)),)
    assert layout.rank_stages == ((0, 3), (1, 4), (2, 5))
    assert interleaved_layout(2, 3).rank_stages == ((0, 2, 4), (1, 3, 5))


# N = 2, v = 2, M = 2: one round of R = 2. Rank 0 warms up with (v-1)R + 2(N-1) = 4
# forwards (phases 0 0 1 1) and drains 4 backwards (phases 1 1 0 0); rank 1 warms up
# with 2, then F(1) B(1) twice, then B(0) B(0).
# M = 4: two rounds of R = 2; forwards cycle phases in blocks of 2, backwards too.
@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (
            2,
            [
                "F0.0 F0.1 F1.0 F1.1 B1.0 B1.1 B0.0 B0.1",
                "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 B0.0 B0.1",
            ],
        ),
        (
            4,
            [
                "F0.0 F0.1 F1.0 F1.1 F0.2 B1.0 F0.3 B1.1 F1.2 B0.0 F1.3 B0.1 B1.2 B1.3 B0.2 B0.3",
                "F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 B0.1 F1.2 B1.2 F1.3 B1.3 B0.2 B0.3",
            ],
        ),
    ],
)
def test_hand_derived(chunks: int, expected: list[str]) -> None:
    assert rows(2, chunks) == expected
    assert generate("interleaved-1f1b", 2, chunks) == interleaved_1f1b(2, chunks)


@pytest.mark.parametrize("ranks", range(1, 7))
@pytest.mark.parametrize("v", [2, 3])
def test_equals_pytorch_generator(ranks: int, v: int) -> None:
    for chunks in range(1, 3 * ranks + 3):
        if chunks % max(1, chunks // ranks):
            with pytest.raises(ScheduleError, match="rounds"):
                interleaved_1f1b(ranks, chunks, v)
            continue
        ours = interleaved_1f1b(ranks, chunks, v)
        theirs = from_torch_actions(
            interleaved_rows(ranks, chunks, v), interleaved_layout(ranks, v), chunks
        )
        assert ours.steps == theirs.steps, (ranks, chunks, v)
        validate(ours)


def test_stages_per_rank_must_be_two_or_more() -> None:
    with pytest.raises(ScheduleError, match="stages_per_rank must be an integer >= 2"):
        interleaved_1f1b(2, 4, 1)
