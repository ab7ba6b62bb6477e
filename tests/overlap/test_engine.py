"""The interleaved F&B pair on two processes forming an expert-parallel group."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .engine_workers import engine_cases

CASES = [(None, True), (None, False), ("nonreentrant", True), ("reentrant", True)]


def test_pair_is_exact_and_forward_only_under_no_grad() -> None:
    """Every case on one launch of two processes (checkpointing none / non-reentrant /
    reentrant, with and without the weight-gradient split; then torch.no_grad())."""
    done = run_distributed(engine_cases, 2, CASES, timeout=120)
    assert done == [len(CASES) + 1] * 2


def test_peer_failure_ends_in_bounded_time() -> None:
    from .engine_workers import peer_failure

    r0, r1 = run_distributed(peer_failure, 2, timeout=60)
    assert r1.startswith("RuntimeError: boom")
    assert r0.startswith("StepTimeout: F comm 1 did not complete within 3 s"), r0
