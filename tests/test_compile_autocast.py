"""torch.compile'd stages with the default split backward, activation checkpointing and
bf16 autocast through a 2-rank DualPipeV pipeline, against one process."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .training_workers import check_compile_checkpointing_autocast


def test_compile_checkpointing_autocast_match_single_process() -> None:
    reports = run_distributed(check_compile_checkpointing_autocast, 2, timeout=300)
    assert all(len(r) == 4 for r in reports)
