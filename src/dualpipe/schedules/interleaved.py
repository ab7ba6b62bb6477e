"""Interleaved 1F1B (Megatron's virtual stages), in the order PyTorch's
``ScheduleInterleaved1F1B`` runs it."""

from __future__ import annotations

from ..errors import ScheduleError
from .builder import RankBuilder
from .layout import interleaved_layout
from .registry import register, spec
from .schedule import Schedule

__all__ = ["interleaved_1f1b", "round_size", "INTERLEAVED_STAGES_PER_RANK"]

INTERLEAVED_STAGES_PER_RANK = 2
"""``v`` of the registered ``interleaved-1f1b``; call :func:`interleaved_1f1b` for others."""


def round_size(num_ranks: int, num_chunks: int) -> int:
    """Micro-batches per round (``R``); raises unless ``num_chunks`` splits into rounds."""
    rounds = max(1, num_chunks // num_ranks)
    if num_chunks % rounds:
        raise ScheduleError(
            f"interleaved-1f1b: num_chunks ({num_chunks}) must be a multiple of the number of"
            f" rounds max(1, num_chunks // ranks) = {rounds}"
        )
    return num_chunks // rounds


def _rounds_problem(num_ranks: int, num_chunks: int) -> str | None:
    try:
        round_size(num_ranks, num_chunks)
    except ScheduleError as exc:
        return str(exc).removeprefix("interleaved-1f1b: ")
    return None


def interleaved_1f1b(
    num_ranks: int, num_chunks: int, stages_per_rank: int = INTERLEAVED_STAGES_PER_RANK
) -> Schedule:
    """Interleaved 1F1B with ``stages_per_rank`` (v >= 2) stages per rank."""
    n, m, v = num_ranks, num_chunks, stages_per_rank
    if not isinstance(v, int) or isinstance(v, bool) or v < 2:
        raise ScheduleError(f"interleaved-1f1b: stages_per_rank must be an integer >= 2, got {v!r}")
    spec("interleaved-1f1b").check(n, m)
    per_round = round_size(n, m)
    rows = []
    for r in range(n):
        b = RankBuilder(v)
        total = v * m
        warmup = min((v - 1) * per_round + 2 * (n - 1 - r), total)
        for k in range(warmup):
            b.f((k // per_round) % v)
        for k in range(total - warmup):
            b.f(((warmup + k) // per_round) % v)
            b.b(v - 1 - (k // per_round) % v)
        for k in range(total - warmup, total):
            b.b(v - 1 - (k // per_round) % v)
        rows.append(tuple(b.steps))
    return Schedule(
        "interleaved-1f1b" if v == INTERLEAVED_STAGES_PER_RANK else f"interleaved-1f1b-v{v}",
        interleaved_layout(n, v),
        m,
        tuple(rows),
    )


@register(
    "interleaved-1f1b",
    label="Interleaved 1F1B",
    layout=lambda num_ranks: interleaved_layout(num_ranks, INTERLEAVED_STAGES_PER_RANK),
    description="Megatron's virtual stages (PyTorch's ScheduleInterleaved1F1B order), "
    "2 stages per rank looped: rank r holds stages r and r+N",
    extra=_rounds_problem,
    extra_text="micro-batches a multiple of max(1, M // N) (PyTorch's rounds)",
)
def _registered(num_ranks: int, num_chunks: int) -> Schedule:
    """Interleaved 1F1B with two stages per rank."""
    return interleaved_1f1b(num_ranks, num_chunks)
