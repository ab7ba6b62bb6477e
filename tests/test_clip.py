"""clip_grad_norm_ across pipeline ranks equals torch's on one process (DualPipe's mirrored
copies counted once), for the 2-norm and the max-norm."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .training_workers import check_clipping


def test_clip_matches_single_process() -> None:
    reports = run_distributed(check_clipping, 2, timeout=120)
    assert all(len(r) == 2 for r in reports)
