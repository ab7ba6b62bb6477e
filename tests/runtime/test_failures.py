"""Clear errors, no hangs: bad arguments, a failing stage, mirrored DualPipe copies."""

from __future__ import annotations

from dualpipe.testing import run_distributed

from .failure_workers import bad_arguments, ddp_refused, mirrored, odd_dualpipe, stage_failure


def test_failing_stage_stops_every_rank_quickly() -> None:
    results = run_distributed(stage_failure, 3, timeout=120)
    for message, elapsed in results:
        assert "rank 1 failed in F0.2" in message, message
        assert "boom" in message
        assert elapsed < 10.0, elapsed  # the configured timeout is 30 s


def test_bad_arguments_raise_clear_errors() -> None:
    rank0, rank1 = run_distributed(bad_arguments, 2, timeout=120)
    assert "chunks must be a positive integer, got 0" in rank0["zero chunks"]
    assert "does not split into 4 equal micro-batches" in rank0["uneven batch"]
    assert "needs the inputs" in rank0["no inputs"]
    assert "needs a criterion" in rank0["no criterion"]
    assert "labels[0] must be a tensor, got str" in rank0["label not a tensor"]
    assert "one device" in rank0["two devices"]
    assert "needs 2 module(s) per rank, got 1" in rank0["one module"]
    assert "unknown schedule 'zigzag'" in rank0["unknown schedule"]
    assert "takes no labels" in rank1["labels elsewhere"]
    assert "takes no inputs" in rank1["inputs elsewhere"]
    told = [rank1["told of rank 0's no inputs"], rank1["told of rank 0's no criterion"]]
    assert all("rank 0: invalid step arguments" in m for m in told), told


def test_dualpipe_refuses_odd_rank_count() -> None:
    for message in run_distributed(odd_dualpipe, 3, timeout=60):
        assert "number of ranks must be even, got 3" in message


def test_mirrored_copies_checked_synced_and_summed() -> None:
    for refused, synced, summed in run_distributed(mirrored, 2, timeout=60):
        assert refused and synced and summed


def test_ddp_wrapped_stages_are_refused() -> None:
    for messages in run_distributed(ddp_refused, 2, timeout=60):
        stage, nested, composable, fsdp = messages
        assert stage.startswith("modules[0] is wrapped by DDP (DistributedDataParallel)"), stage
        assert nested.startswith("modules[1] (its submodule '1') is wrapped by DDP"), nested
        assert composable.startswith("modules[0] is wrapped by DDP (DDPMLPStage)"), composable
        for m in (stage, nested, composable):
            assert "fully_shard" in m and "GradientSync" in m, m
        assert fsdp == "fully_shard accepted"
