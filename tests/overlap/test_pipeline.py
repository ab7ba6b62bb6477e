"""Stages written as parts in the pipeline: 2 pipeline ranks x 2 expert-parallel ranks."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .pipeline_workers import failure_reaches_the_job, pipeline_cases

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
