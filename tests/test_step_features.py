"""What a training loop uses around the step, on 2 gloo ranks (DualPipe and DualPipeV):
mean loss reduction and losses on every rank equal one process, clipping across the
pipeline equals torch's on one process, step metrics agree on every rank, and the measured
timeline is drawn."""

from __future__ import annotations

import json
from pathlib import Path

from dualpipe.testing import run_distributed

from .training_workers import check_step_features


def test_mean_loss_shared_loss_clip_metrics_timeline(tmp_path: Path) -> None:
    reports = run_distributed(check_step_features, 2, str(tmp_path), timeout=120)
    assert all(len(r) == 2 for r in reports)
    for schedule in ("dualpipe", "dualpipev"):
        assert (tmp_path / f"{schedule}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        trace = json.loads((tmp_path / f"{schedule}.json").read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        assert any(e.get("name", "").startswith("F") for e in events)
