"""Every message belongs to one pipeline and one step: rebuilding on the same group is
exact, disagreeing ranks get one clear error, replicas are independent, and the
pipeline's timeout (not the group's) bounds its waits."""

from __future__ import annotations

import pytest
import torch

from dualpipe.errors import PipelineError
from dualpipe.testing import run_distributed
from dualpipe.transport.protocol import Stamp, disagreement, wire_tag

from .protocol_workers import (
    disagreements,
    rebuild_after_failure,
    replicas,
    slower_than_group_timeout,
)


def test_tags_tell_pipelines_steps_and_messages_apart() -> None:
    tags = {wire_tag(p, s, q) for p in range(3) for s in range(3) for q in range(-1, 40)}
    assert len(tags) == 3 * 3 * 41
    assert all(0 <= t < 2**31 for t in tags)
    with pytest.raises(PipelineError, match="out of range"):
        wire_tag(0, 0, 1 << 20)


def test_stamp_names_the_field_the_values_and_the_ranks() -> None:
    mine = Stamp(pipeline=3, step=7, num_chunks=4, training=True, static_shapes=False)
    mine.check(mine.encode(torch.device("cpu")), src=0, dst=1)
    other = Stamp(pipeline=3, step=7, num_chunks=6, training=True, static_shapes=False)
    with pytest.raises(PipelineError, match="disagree on num_chunks: 6 on rank 0; 4 on rank 1"):
        mine.check(other.encode(torch.device("cpu")), src=0, dst=1)
    assert disagreement({0: {"a": 1}, 1: {"a": 1}}, "x") is None


def test_rebuild_on_the_same_group_after_a_failure_is_exact() -> None:
    for report in run_distributed(rebuild_after_failure, 2, timeout=120):
        assert report[0].startswith("failed:") and "boom" in report[0], report
        assert report[1:] == ["training exact", "inference failed", "inference exact"], report


def test_disagreeing_ranks_fail_quickly_with_the_field_named() -> None:
    results = run_distributed(disagreements, 2, timeout=120)
    for rank_results in results:
        (chunks, t1), (schedule, t2), (static, t3), (grad, t4), (late, t5), (ok, _) = (
            rank_results
        )
        assert "disagree on num_chunks: 4 on rank 0; 6 on rank 1" in chunks, chunks
        assert "disagree on schedule: 'dualpipe' on rank 0; 'dualpipev' on rank 1" in schedule
        assert "disagree on static_shapes: True on rank 0; False on rank 1" in static, static
        assert "disagree on training: True on rank 0; False on rank 1" in grad, grad
        assert "disagree on static_shapes: False on rank 0; True on rank 1" in late, late
        assert ok == "no error"
        assert max(t1, t2, t3, t4, t5) < 5.0  # the configured timeout is 30 s


def test_a_replica_failure_fails_the_job_and_rebuilt_pipelines_train_exactly() -> None:
    results = run_distributed(replicas, 4, timeout=120)
    for report in results[:2]:
        assert report[0].startswith("step 0 failed") and "boom" in report[0], report
    for report in results[2:]:  # the other replica: its step 0 or 1 fails, naming process 1
        failed = [line for line in report if "failed" in line]
        assert len(failed) == 1, report
        assert "process 1 (pipeline rank 1) failed" in failed[0] and "boom" in failed[0]
    for report in results:
        assert report[-1] == "rebuilt: exact", report


def test_a_stage_slower_than_the_group_timeout_completes() -> None:
    for elapsed, exact in run_distributed(slower_than_group_timeout, 2, timeout=120):
        assert exact and elapsed > 3.0
