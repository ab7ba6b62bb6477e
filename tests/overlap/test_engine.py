"""The interleaved F&B pair on two processes forming an expert-parallel group."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .engine_workers import forward_only, pair_vs_sequential


@pytest.mark.parametrize(
    "ckpt,split",
    [(None, True), (None, False), ("nonreentrant", True), ("reentrant", True)],
)
def test_pair_is_exact(ckpt: str | None, split: bool) -> None:
    run_distributed(pair_vs_sequential, 2, ckpt, split, timeout=90)


def test_forward_only_under_no_grad() -> None:
    assert run_distributed(forward_only, 2, timeout=60) == [True, True]
