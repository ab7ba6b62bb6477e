"""DualPipe / DualPipeV / baselines on spawned gloo ranks equal the single-process model:
losses and outputs bit-equal (torch.equal), gradients equal to float rounding."""

from __future__ import annotations

import pytest

from dualpipe.schedules import Schedule, interleaved_1f1b
from dualpipe.testing import run_distributed

from .workers import (
    check_custom_schedule,
    check_large_sends,
    check_many,
    check_mapped,
    check_static_shapes,
)

KINDS = ["mlp", "traps", "two"]


def _cases(schedule: str, chunk_counts: list[int]) -> list[tuple[str, str, list[int]]]:
    return [(schedule, kind, chunk_counts) for kind in KINDS]


@pytest.mark.parametrize(
    "world,cases",
    [
        (1, _cases("dualpipev", [2, 3, 5])),
        (2, _cases("dualpipe", [4, 6, 10]) + _cases("dualpipev", [4, 5, 9])),
        (3, _cases("dualpipev", [6, 7, 12])),
        (4, _cases("dualpipe", [8, 12]) + _cases("dualpipev", [8, 11])),
        (6, _cases("dualpipe", [12, 16])),
    ],
    ids=["world1", "world2", "world3", "world4", "world6"],
)
def test_matches_single_process(world: int, cases: list[tuple[str, str, list[int]]]) -> None:
    reports = run_distributed(check_many, world, cases, timeout=240)
    expected = sum(len(c[2]) for c in cases)
    assert all(len(r) == expected for r in reports)


@pytest.mark.parametrize(
    "world,cases",
    [
        (
            2,
            [
                ("zbv", "mlp", [2, 5]),
                ("zbv", "traps", [3]),
                ("interleaved-1f1b", "two", [2, 4]),
                ("dualpipev", "traps", [1, 3]),  # fewer micro-batches than 2N
                ("dualpipe", "mlp", [2]),  # one per direction
                ("v-half", "traps", [4]),
                ("v-min", "mlp", [3]),
            ],
        ),
        (
            3,
            [
                ("zbv", "two", [4]),
                ("interleaved-1f1b", "traps", [3, 6]),
                ("dualpipev", "mlp", [2]),
                (interleaved_1f1b(3, 3, 3), "mlp", [3]),  # three stages per rank
            ],
        ),
        (
            4,
            [
                ("dualpipe", "traps", [2, 6]),
                ("zbv", "mlp", [3]),
                ("v-half", "two", [8]),
                ("v-min", "traps", [5]),
            ],
        ),
    ],
    ids=["world2", "world3", "world4"],
)
def test_new_schedules_and_few_micro_batches(
    world: int, cases: list[tuple[str | Schedule, str, list[int]]]
) -> None:
    reports = run_distributed(check_many, world, cases, timeout=240)
    expected = sum(len(c[2]) for c in cases)
    assert all(len(r) == expected for r in reports), reports


def test_baselines_match_single_process() -> None:
    cases = [(name, kind, [4, 6]) for name in ("1f1b", "zb1p", "gpipe") for kind in KINDS]
    reports = run_distributed(check_many, 3, cases, timeout=240)
    assert all(len(r) == 2 * len(cases) for r in reports)


def test_large_sends_posted_by_a_thread_match_single_process() -> None:
    reports = run_distributed(check_large_sends, 2, timeout=120)
    assert all(len(r) == 3 for r in reports)


def test_static_shapes_send_headers_once() -> None:
    results = run_distributed(check_static_shapes, 2, timeout=120)
    assert results[0][0] > 0 and results[1][0] > 0  # first step: headers
    assert results[0][1] == 0 and results[1][1] == 0  # later steps: none
    assert "static_shapes=True" in results[0][2]  # rank 0 runs the first stage: it notices
    assert "rank 0 failed" in results[1][2]  # and tells rank 1


def test_rank_mapping() -> None:
    for report in run_distributed(check_mapped, 2, timeout=120):
        assert len(report) == 2


def test_custom_schedule_runs_and_bad_ones_are_refused() -> None:
    for messages in run_distributed(check_custom_schedule, 2, timeout=120):
        assert "fixed schedule of 3 micro-batches; got num_chunks=4" in messages[0]
        assert "I0.0" in messages[1] and "W" in messages[1], messages[1]
