"""Stages written as parts in the pipeline: 2 pipeline ranks x 2 expert-parallel ranks."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .pipeline_workers import failure_inside_a_pair, failure_reaches_the_job, pipeline_cases

CASES = [
    ("dualpipev", 6, None, True, None),  # pairs: F&B, and F&F / B&B where faster
    ("dualpipev", 6, None, True, False),  # F&B pairs only
    ("dualpipev", 4, "reentrant", True, None),
    ("dualpipe", 4, "nonreentrant", True, None),
    ("dualpipe", 6, None, True, None),
    ("dualpipev", 4, None, False, None),  # inference under torch.no_grad()
    ("dualpipev", 4, "hook", True, None),  # the class's own overlapped_forward_backward wins
]


def test_steps_are_exact_and_pairs_interleaved() -> None:
    results = run_distributed(pipeline_cases, 4, CASES, timeout=240)
    for rank, per_rank in enumerate(results):
        assert len(per_rank) == len(CASES)
        for (name, _, ckpt, train, pairs), (interleaved, kinds) in zip(
                CASES, per_rank, strict=True):
            if ckpt == "hook":
                assert interleaved == -1  # checked on the ranks: hook calls == pairs
                assert kinds == ["FB"]  # no plug-in runs F&F / B&B pairs: none made
            else:
                assert interleaved > 0 if train else interleaved == 0
                # every rank of these pipelines runs a pair of two forwards in the warm-up
                assert "FF" in kinds if pairs is None else kinds == ["FB"], (name, rank, kinds)


def test_a_failure_reaches_every_pipeline_of_the_job() -> None:
    # process 2 fails in a part; its pipeline (0, 2) fails as always, and the other
    # pipeline (1, 3), whose ranks wait in all-to-alls with process 2, hears of it within
    # the failure watch's period instead of waiting for its 60 s timeout
    results = run_distributed(failure_reaches_the_job, 4, timeout=120)
    for rank, (message, elapsed) in enumerate(results):
        assert "boom in a part" in message, (rank, message)
        assert elapsed < 10.0, (rank, elapsed)
    assert results[2][0].startswith("ActionFailure: rank 1 failed in F")
    for rank in (1, 3):
        assert "process 2 (pipeline rank 1) failed" in results[rank][0], results[rank][0]


@pytest.mark.parametrize(("kind", "failed", "label"),
                         [("FF", 2, "F1.0+F0.1"), ("BB", 0, "B1.2+B0.1")])
def test_a_failure_inside_a_pair_of_two_forwards_or_two_backwards(
        kind: str, failed: int, label: str) -> None:
    # a part raises inside the pair: every process ends its step with one clear error
    # naming the failed rank and action, within seconds (the timeout is 60 s)
    results = run_distributed(failure_inside_a_pair, 4, kind, timeout=120)
    boom = f"boom in a pair's {'forward' if kind == 'FF' else 'backward'}"
    for rank, (message, elapsed, kinds) in enumerate(results):
        assert kind in kinds or rank // 2 != failed // 2, (rank, kinds)
        assert boom in message, (rank, message)
        assert elapsed < 10.0, (rank, elapsed)
    own = results[failed][0]
    assert own.startswith(f"ActionFailure: rank {failed // 2} failed in "), own
    assert any(half in own for half in label.split("+")), own


def test_a_failure_after_some_ranks_finished_the_step_ends_at_once() -> None:
    # process 0 fails in the step's last pair, after pipeline rank 1 (processes 2, 3)
    # finished its part: the failed pipeline's ranks drain without waiting for a drain
    # note from a rank that finished (it said so), so nothing waits 30 s
    results = run_distributed(failure_inside_a_pair, 4, "late", timeout=120)
    for rank, (message, elapsed, _) in enumerate(results):
        assert elapsed < 10.0, (rank, elapsed)
        if rank in (0, 1):
            assert "boom in a pair's backward" in message, (rank, message)
