"""Weight-gradient work runs inside W actions, never inside input-only backwards."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .deferral_workers import where_weight_work_runs


@pytest.mark.parametrize("schedule,world,chunks", [("dualpipev", 2, 6), ("zb1p", 2, 4)])
def test_weight_work_runs_in_w_actions(schedule: str, world: int, chunks: int) -> None:
    for counts in run_distributed(where_weight_work_runs, world, schedule, chunks, timeout=120):
        assert counts["I"] == 0, counts
        assert counts["outside"] == 0, counts
        assert counts["steps_W"] > 0
        # every W runs exactly the deferred weight branch of one stage and micro-batch
        assert counts["W"] == counts["steps_W"], counts
