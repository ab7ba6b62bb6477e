"""Schedule generators: DualPipe, DualPipeV and the baselines (GPipe, 1F1B, ZB1P)."""

from __future__ import annotations

from .builder import RankBuilder, drop_chunks
from .layout import dualpipe_layout, dualpipev_layout, linear_layout
from .registry import SCHEDULES, generate, register
from .schedule import Schedule

__all__ = [
    "SCHEDULES",
    "generate",
    "dualpipe",
    "dualpipev",
    "one_f_one_b",
    "zb1p",
    "gpipe",
]


def _bidirectional_rank(
    b: RankBuilder, h: int, half: int, main_repeats: int, split_first_pair: bool
) -> None:
    """The eight steps shared by DualPipe (h = distance to the nearer end, half = N/2)
    and DualPipeV (h = r, half = N). See docs/schedules.md."""
    outer = half - h - 1
    for _ in range(2 * outer):  # step 1
        b.f(0)
    for _ in range(h + 1):  # step 2
        b.f(0)
        b.f(1)
    for _ in range(outer):  # step 3
        b.b(1, zero_bubble=True)
        b.w()
        b.f(1)
    for i in range(main_repeats):  # step 4
        if i == 0 and split_first_pair:
            b.f(0)
            b.b(1)
        else:
            b.fb(0, 1)
        b.fb(1, 0)
    for _ in range(outer):  # step 5
        b.b(1)
        b.fb(1, 0)
    middle = (h + 1) // 2  # step 6
    for i in range(h + 1):
        b.b(1, zero_bubble=i > middle or (i == middle and h % 2 == 1))
        b.b(0, zero_bubble=i >= middle)
    for _ in range(outer):  # step 7
        b.w()
        b.b(0, zero_bubble=True)
    for _ in range(h + 1):  # step 8
        b.w()
    if b.pending_weights():
        raise AssertionError("weight gradients left deferred")  # generator bug


@register(
    "dualpipe",
    label="DualPipe",
    layout=dualpipe_layout,
    description="bidirectional: half the micro-batches enter at rank 0, half at rank N-1",
    rank_multiple=2,
    min_ranks=2,
    chunk_multiple=2,
)
def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe on ``num_ranks`` (even, >= 2) ranks; ``num_chunks`` (even) micro-batches
    in total, half going down from rank 0 and half up from rank N-1.

    With ``num_chunks >= 2N`` the lists follow the step table of docs/schedules.md. With fewer,
    the schedule for ``2N`` micro-batches is generated and the surplus micro-batches'
    actions are dropped on every rank (:func:`~dualpipe.schedules.builder.drop_chunks`).
    """
    n, half, c = num_ranks, num_ranks // 2, num_chunks // 2
    full = max(c, n)
    rows = []
    for r in range(n):
        h = min(r, n - 1 - r)
        b = RankBuilder(2)
        _bidirectional_rank(b, h, half, full - n + h + 1, split_first_pair=h == half - 1)
        rows.append(drop_chunks(b.steps, c))
    return Schedule("dualpipe", dualpipe_layout(n), c, tuple(rows))


@register(
    "dualpipev",
    label="DualPipeV",
    layout=dualpipev_layout,
    description="V-shape (cut-in-half): 2N stages, rank r holds stages r and 2N-1-r",
)
def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV ("cut-in-half") on ``num_ranks`` (>= 1) ranks holding ``2N`` stages;
    ``num_chunks`` micro-batches, all entering and leaving at rank 0.

    With ``num_chunks >= 2N`` the lists follow the step table of docs/schedules.md; with fewer,
    the ``2N`` schedule with the surplus micro-batches dropped.
    """
    n, c = num_ranks, num_chunks
    full = max(c, 2 * n)
    rows = []
    for r in range(n):
        b = RankBuilder(2)
        _bidirectional_rank(b, r, n, full - 2 * n + r + 1, split_first_pair=r == n - 1)
        rows.append(drop_chunks(b.steps, c))
    return Schedule("dualpipev", dualpipev_layout(n), c, tuple(rows))


@register(
    "1f1b",
    label="1F1B",
    layout=linear_layout,
    description="one forward, one backward in the steady state",
)
def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: rank r warms up with ``P-r-1`` forwards, alternates F and B, then drains."""
    rows = []
    for r in range(num_ranks):
        b = RankBuilder(1)
        warmup = min(num_ranks - r - 1, num_chunks)
        for _ in range(warmup):
            b.f(0)
        for _ in range(num_chunks - warmup):
            b.f(0)
            b.b(0)
        for _ in range(warmup):
            b.b(0)
        rows.append(tuple(b.steps))
    return Schedule("1f1b", linear_layout(num_ranks), num_chunks, tuple(rows))


@register(
    "zb1p",
    label="ZB1P",
    layout=linear_layout,
    description="1F1B with split backwards, weight gradients moved into the bubbles (ZB-H1)",
)
def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB1P (ZB-H1): 1F1B with every backward split into ``I`` and ``W``.

    Rank r runs the 1F1B order with input-only backwards. In the steady state it
    keeps ``r`` weight gradients deferred (a W follows an ``I`` once more are
    pending), so later ranks push input gradients upstream sooner; in the drain
    each ``I`` is followed by one W, and the W's still pending run last. With the
    zero-bubble paper's costs (forward, input-only backward and weight gradient
    equally long) the bubble is ``(P-1)(F+B-2W)``; peak activations equal 1F1B's.
    """
    rows = []
    for r in range(num_ranks):
        b = RankBuilder(1)
        warmup = min(num_ranks - r - 1, num_chunks)
        keep = r
        for _ in range(warmup):
            b.f(0)
        for _ in range(num_chunks - warmup):
            b.f(0)
            b.b(0, zero_bubble=True)
            if b.pending_weights() > keep:
                b.w()
        for _ in range(warmup):
            b.b(0, zero_bubble=True)
            if b.pending_weights():
                b.w()
        while b.pending_weights():
            b.w()
        rows.append(tuple(b.steps))
    return Schedule("zb1p", linear_layout(num_ranks), num_chunks, tuple(rows))


@register(
    "gpipe",
    label="GPipe",
    layout=linear_layout,
    description="every forward, then every backward",
    compare=False,
)
def gpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """GPipe: every forward, then every (full) backward."""
    rows = []
    for _ in range(num_ranks):
        b = RankBuilder(1)
        for _ in range(num_chunks):
            b.f(0)
        for _ in range(num_chunks):
            b.b(0)
        rows.append(tuple(b.steps))
    return Schedule("gpipe", linear_layout(num_ranks), num_chunks, tuple(rows))
