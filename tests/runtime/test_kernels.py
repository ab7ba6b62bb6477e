"""A stage class with ``overlapped_forward_backward`` gets every F&B pair."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .kernels_workers import overlapped


@pytest.mark.parametrize("schedule,world,chunks", [("dualpipev", 2, 8), ("dualpipe", 2, 8)])
def test_overlapped_hook_runs_every_pair(schedule: str, world: int, chunks: int) -> None:
    for calls, pairs in run_distributed(overlapped, world, schedule, chunks, timeout=120):
        assert pairs > 0
        assert calls == pairs
