"""ZBV: the zero-bubble V schedule, in the order PyTorch's ``ScheduleZBVZeroBubble`` runs
it."""

from __future__ import annotations

from .actions import Step
from .builder import RankBuilder, drop_chunks
from .layout import dualpipev_layout
from .registry import register
from .schedule import Schedule

__all__ = ["zbv", "zbv_rank"]


def zbv_rank(rank: int, num_ranks: int, num_chunks: int) -> list[Step]:
    """The steps of ``rank`` (before surplus micro-batches are dropped)."""
    n, r = num_ranks, rank
    m = max(num_chunks, 2 * n - 1)
    b = RankBuilder(2)
    for _ in range(2 * (n - r) - 1):
        b.f(0)
    for _ in range(r):
        b.f(1)
        b.f(0)
    for _ in range(n - r):
        b.f(1)
        b.b(1, zero_bubble=True)
        b.w(1)
    while b.forwards(1) < b.forwards(0) or b.forwards(0) < m:
        if b.forwards(0) < m:
            b.f(0)
        b.b(0, zero_bubble=True)
        b.w(0)
        b.f(1)
        b.b(1, zero_bubble=True)
        b.w(1)
    for _ in range(r):
        b.b(0, zero_bubble=True)
        b.b(1, zero_bubble=True)
    for _ in range(n - r):
        b.b(0, zero_bubble=True)
        b.w(0)
    while b.pending_weights(1):
        b.w(1)
    while b.pending_weights(0):
        b.w(0)
    return b.steps


@register(
    "zbv",
    label="ZBV",
    layout=dualpipev_layout,
    description="zero-bubble V (PyTorch's ScheduleZBVZeroBubble order) on DualPipeV's layout",
)
def zbv(num_ranks: int, num_chunks: int) -> Schedule:
    """ZBV on ``num_ranks`` ranks (2N stages in a V) for ``num_chunks`` micro-batches."""
    rows = tuple(drop_chunks(zbv_rank(r, num_ranks, num_chunks), num_chunks)
                 for r in range(num_ranks))
    return Schedule("zbv", dualpipev_layout(num_ranks), num_chunks, rows)
