"""PyTorch's own generators, called without a process group: their per-rank order as
``str(_Action)`` lists (``None`` for idle slots)."""

from __future__ import annotations

from types import SimpleNamespace

from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)


def _strings(actions: list) -> list[str | None]:  # type: ignore[type-arg]
    return [None if a is None else str(a) for a in actions]


def zbv_rows(num_ranks: int, num_chunks: int) -> list[list[str | None]]:
    """ScheduleZBVZeroBubble's pipeline_order (its _calculate_single_rank_operations)."""
    fake = SimpleNamespace(
        pp_group_size=num_ranks, num_stages=2 * num_ranks, _n_microbatches=num_chunks
    )
    return [
        _strings(ScheduleZBVZeroBubble._calculate_single_rank_operations(fake, r))
        for r in range(num_ranks)
    ]


def interleaved_rows(num_ranks: int, num_chunks: int, v: int) -> list[list[str | None]]:
    """ScheduleInterleaved1F1B's pipeline_order, with the rounds its constructor sets."""
    rounds = max(1, num_chunks // num_ranks)
    fake = SimpleNamespace(
        pp_group_size=num_ranks,
        _n_microbatches=num_chunks,
        n_local_stages=v,
        number_of_rounds=rounds,
        microbatches_per_round=num_chunks // rounds,
    )
    return [
        _strings(ScheduleInterleaved1F1B._calculate_single_rank_operations(fake, r))
        for r in range(num_ranks)
    ]


def dump_csv(rows: list[list[str | None]], path: str) -> None:
    """PyTorch's own CSV saver (``PipelineScheduleMulti._dump_csv``) on ``rows``."""
    from torch.distributed.pipelining.schedules import _Action

    order = {r: [None if a is None else _Action.from_str(a) for a in row]
             for r, row in enumerate(rows)}
    PipelineScheduleMulti._dump_csv(SimpleNamespace(pipeline_order=order), path)
