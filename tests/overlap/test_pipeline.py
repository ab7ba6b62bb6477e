"""Stages written as parts in the pipeline: 2 pipeline ranks x 2 expert-parallel ranks."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .pipeline_workers import pipeline_cases

CASES = [
    ("dualpipev", 6, None, True),
    ("dualpipev", 4, "reentrant", True),
    ("dualpipe", 4, "nonreentrant", True),
    ("dualpipev", 4, None, False),  # inference under torch.no_grad()
    ("dualpipev", 4, "hook", True),  # the class's own overlapped_forward_backward wins
]


def test_steps_are_exact_and_pairs_interleaved() -> None:
    results = run_distributed(pipeline_cases, 4, CASES, timeout=180)
    for per_rank in results:
        assert len(per_rank) == len(CASES)
        for (_, _, ckpt, train), interleaved in zip(CASES, per_rank, strict=True):
            if ckpt == "hook":
                assert interleaved == -1  # checked on the ranks: hook calls == pairs
            else:
                assert interleaved > 0 if train else interleaved == 0
