"""Schedule generators: DualPipe, DualPipeV and the baselines (GPipe, 1F1B, ZB1P).

Each generator returns a :class:`~dualpipe.schedules.schedule.Schedule` whose
per-rank lists follow ``SCHEDULES.md`` to the letter. DualPipe on 4 ranks,
10 micro-batches (``C = 5`` per direction), printed as tokens::

    rank 0: F0.0 F0.1 F0.2 F1.0 F0.3 F1.1 F0.4+B1.0 ...

Micro-batch ids count per phase: the k-th forward of a phase takes id k and
the k-th backward of that phase takes id k; ``W`` names the micro-batch whose
deferred weight gradient it runs (FIFO over the rank's input-only backwards).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .actions import Action, Op, Overlap, Step
from .layout import dualpipe_layout, dualpipev_layout, linear_layout
from .schedule import Schedule, ScheduleError

__all__ = [
    "SCHEDULES",
    "generate",
    "dualpipe",
    "dualpipev",
    "one_f_one_b",
    "zb1p",
    "gpipe",
]


class _RankBuilder:
    """Appends steps for one rank, numbering micro-batches and tracking deferred W's."""

    def __init__(self, num_phases: int) -> None:
        self.steps: list[Step] = []
        self._next_f = [0] * num_phases
        self._next_b = [0] * num_phases
        self._deferred: deque[Action] = deque()

    def _forward(self, phase: int) -> Action:
        action = Action(Op.FORWARD, phase, self._next_f[phase])
        self._next_f[phase] += 1
        return action

    def _backward(self, phase: int, zero_bubble: bool) -> Action:
        action = Action(Op.INPUT if zero_bubble else Op.BACKWARD, phase, self._next_b[phase])
        self._next_b[phase] += 1
        if zero_bubble:
            self._deferred.append(action)
        return action

    def f(self, phase: int) -> None:
        self.steps.append(self._forward(phase))

    def b(self, phase: int, zero_bubble: bool = False) -> None:
        self.steps.append(self._backward(phase, zero_bubble))

    def w(self) -> None:
        if not self._deferred:
            raise AssertionError("W with nothing deferred")  # generator bug
        done = self._deferred.popleft()
        self.steps.append(Action(Op.WEIGHT, done.phase, done.chunk))

    def fb(self, f_phase: int, b_phase: int, zero_bubble: bool = False) -> None:
        fwd = self._forward(f_phase)
        self.steps.append(Overlap(fwd, self._backward(b_phase, zero_bubble)))

    @property
    def pending_weights(self) -> int:
        return len(self._deferred)


def _bidirectional_rank(
    b: _RankBuilder, h: int, half: int, main_repeats: int, split_first_pair: bool
) -> None:
    """The eight steps shared by DualPipe (h = distance to the nearer end, half = N/2)
    and DualPipeV (h = r, half = N). See SCHEDULES.md."""
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
    if b.pending_weights:
        raise AssertionError("weight gradients left deferred")  # generator bug


def _check_positive(name: str, value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ScheduleError(f"{name}: {what} must be a positive integer, got {value!r}")


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipe on ``num_ranks`` (even, >= 2) ranks; ``num_chunks`` (even, >= 2N)
    micro-batches in total, half going down from rank 0 and half up from rank N-1."""
    _check_positive("dualpipe", num_ranks, "ranks")
    _check_positive("dualpipe", num_chunks, "chunks")
    if num_ranks % 2:
        raise ScheduleError(f"dualpipe: the number of ranks must be even, got {num_ranks}")
    if num_chunks % 2:
        raise ScheduleError(f"dualpipe: num_chunks must be even, got {num_chunks}")
    if num_chunks < 2 * num_ranks:
        raise ScheduleError(
            f"dualpipe: num_chunks must be >= 2 * ranks = {2 * num_ranks}, got {num_chunks}"
        )
    n, half, c = num_ranks, num_ranks // 2, num_chunks // 2
    rows = []
    for r in range(n):
        h = min(r, n - 1 - r)
        b = _RankBuilder(2)
        _bidirectional_rank(b, h, half, c - n + h + 1, split_first_pair=h == half - 1)
        rows.append(tuple(b.steps))
    return Schedule("dualpipe", dualpipe_layout(n), c, tuple(rows))


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
    """DualPipeV ("cut-in-half") on ``num_ranks`` (>= 1) ranks holding ``2N`` stages;
    ``num_chunks`` (>= 2N) micro-batches, all entering and leaving at rank 0."""
    _check_positive("dualpipev", num_ranks, "ranks")
    _check_positive("dualpipev", num_chunks, "chunks")
    if num_chunks < 2 * num_ranks:
        raise ScheduleError(
            f"dualpipev: num_chunks must be >= 2 * ranks = {2 * num_ranks}, got {num_chunks}"
        )
    n, c = num_ranks, num_chunks
    rows = []
    for r in range(n):
        b = _RankBuilder(2)
        _bidirectional_rank(b, r, n, c - 2 * n + r + 1, split_first_pair=r == n - 1)
        rows.append(tuple(b.steps))
    return Schedule("dualpipev", dualpipev_layout(n), c, tuple(rows))


def gpipe(num_ranks: int, num_chunks: int) -> Schedule:
    """GPipe: every forward, then every (full) backward."""
    _check_positive("gpipe", num_ranks, "ranks")
    _check_positive("gpipe", num_chunks, "chunks")
    rows = []
    for _ in range(num_ranks):
        b = _RankBuilder(1)
        for _ in range(num_chunks):
            b.f(0)
        for _ in range(num_chunks):
            b.b(0)
        rows.append(tuple(b.steps))
    return Schedule("gpipe", linear_layout(num_ranks), num_chunks, tuple(rows))


def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
    """1F1B: rank r warms up with ``P-r-1`` forwards, alternates F and B, then drains."""
    _check_positive("1f1b", num_ranks, "ranks")
    _check_positive("1f1b", num_chunks, "chunks")
    rows = []
    for r in range(num_ranks):
        b = _RankBuilder(1)
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


def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
    """ZB1P (ZB-H1): 1F1B with every backward split into ``I`` and ``W``.

    Rank r runs the 1F1B order with input-only backwards. In the steady state it
    keeps ``r`` weight gradients deferred (a W follows an ``I`` once more are
    pending), so later ranks push input gradients upstream sooner; in the drain
    each ``I`` is followed by one W, and the W's still pending run last. With the
    zero-bubble paper's costs (forward, input-only backward and weight gradient
    equally long) the bubble is ``(P-1)(F+B-2W)``; peak activations equal 1F1B's.
    """
    _check_positive("zb1p", num_ranks, "ranks")
    _check_positive("zb1p", num_chunks, "chunks")
    rows = []
    for r in range(num_ranks):
        b = _RankBuilder(1)
        warmup = min(num_ranks - r - 1, num_chunks)
        keep = r
        for _ in range(warmup):
            b.f(0)
        for _ in range(num_chunks - warmup):
            b.f(0)
            b.b(0, zero_bubble=True)
            if b.pending_weights > keep:
                b.w()
        for _ in range(warmup):
            b.b(0, zero_bubble=True)
            if b.pending_weights:
                b.w()
        while b.pending_weights:
            b.w()
        rows.append(tuple(b.steps))
    return Schedule("zb1p", linear_layout(num_ranks), num_chunks, tuple(rows))


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "dualpipe": dualpipe,
    "dualpipev": dualpipev,
    "1f1b": one_f_one_b,
    "zb1p": zb1p,
    "gpipe": gpipe,
}
"""Generator of every named schedule: ``SCHEDULES[name](num_ranks, num_chunks)``."""


def generate(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """Build the named schedule (``dualpipe``, ``dualpipev``, ``1f1b``, ``zb1p``, ``gpipe``)."""
    try:
        make = SCHEDULES[name.lower()]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}"
        ) from None
    return make(num_ranks, num_chunks)
