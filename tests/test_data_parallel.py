"""DP x PP on a DeviceMesh of 4 gloo processes: GradientSync gives the one-process
gradient of the whole batch, for DualPipe (copies and replicas in one all-reduce) and
DualPipeV."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .training_workers import check_data_parallel


def test_dp_x_pp_matches_single_process() -> None:
    reports = run_distributed(check_data_parallel, 4, timeout=180)
    assert all(len(r) == 2 for r in reports)
    # DualPipe: the 2 copies x 2 replicas of a stage pair reduce together
    assert "group [0, 1, 2, 3]" in reports[0][0], reports[0]
