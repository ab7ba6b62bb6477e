"""Where stages live: which rank and phase computes each stage of each path."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Layout",
    "Position",
    "dualpipe_layout",
    "dualpipev_layout",
    "interleaved_layout",
    "linear_layout",
]

Position = tuple[int, int]
"""A ``(rank, phase)`` pair."""


@dataclass(frozen=True)
class Layout:
    """Placement of model stages on ranks.

    Attributes:
        num_ranks: processes in the pipeline group.
        paths: per stream, the ``(rank, phase)`` of each stage position, in order.
        stages: per stream, the model stage id computed at each position.
        rank_stages: per rank, the model stage ids of the modules the user passes
            on that rank, in the order they are passed.
    """

    num_ranks: int
    paths: tuple[tuple[Position, ...], ...]
    stages: tuple[tuple[int, ...], ...]
    rank_stages: tuple[tuple[int, ...], ...]
    _where: dict[Position, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where: dict[Position, tuple[int, int]] = {}
        for s, path in enumerate(self.paths):
            if len(path) != len(self.stages[s]):
                raise ValueError("each path needs one stage id per position")
            for i, pos in enumerate(path):
                if pos in where:
                    raise ValueError(f"position {pos} appears twice in the layout")
                if not 0 <= pos[0] < self.num_ranks:
                    raise ValueError(f"rank {pos[0]} out of range")
                where[pos] = (s, i)
        object.__setattr__(self, "_where", where)

    @property
    def num_streams(self) -> int:
        """Number of directions micro-batches flow in."""
        return len(self.paths)

    @property
    def num_stages(self) -> int:
        """Distinct model stages (``S_0 ... S_{k-1}``)."""
        return 1 + max(max(s) for s in self.stages)

    @property
    def num_phases(self) -> int:
        """Phases per rank (2 for DualPipe/DualPipeV, 1 otherwise)."""
        return 1 + max(p for _, p in self._where)

    def has(self, rank: int, phase: int) -> bool:
        """Whether ``rank`` has a stage at ``phase``."""
        return (rank, phase) in self._where

    def locate(self, rank: int, phase: int) -> tuple[int, int]:
        """``(stream, position)`` computed by ``rank`` at ``phase``."""
        try:
            return self._where[(rank, phase)]
        except KeyError:
            raise ValueError(f"rank {rank} has no phase {phase} in this layout") from None

    def stage(self, rank: int, phase: int) -> int:
        """Model stage id computed by ``rank`` at ``phase``."""
        stream, pos = self.locate(rank, phase)
        return self.stages[stream][pos]

    def module_index(self, rank: int, phase: int) -> int:
        """Index, in the user's module tuple on ``rank``, of the module run at ``phase``."""
        return self.rank_stages[rank].index(self.stage(rank, phase))

    def next(self, rank: int, phase: int) -> Position | None:
        """Position of the next stage on the path, or None at the end (loss)."""
        stream, pos = self.locate(rank, phase)
        path = self.paths[stream]
        return path[pos + 1] if pos + 1 < len(path) else None

    def prev(self, rank: int, phase: int) -> Position | None:
        """Position of the previous stage on the path, or None at the start (inputs)."""
        stream, pos = self.locate(rank, phase)
        return self.paths[stream][pos - 1] if pos > 0 else None

    def entry(self, stream: int) -> Position:
        """Where micro-batches of ``stream`` enter (its inputs live there)."""
        return self.paths[stream][0]

    def exit(self, stream: int) -> Position:
        """Where ``stream`` ends (its labels and loss live there)."""
        return self.paths[stream][-1]

    def streams_starting_on(self, rank: int) -> tuple[int, ...]:
        """Streams whose inputs enter at ``rank``."""
        return tuple(s for s in range(self.num_streams) if self.entry(s)[0] == rank)

    def streams_ending_on(self, rank: int) -> tuple[int, ...]:
        """Streams whose loss is computed on ``rank``."""
        return tuple(s for s in range(self.num_streams) if self.exit(s)[0] == rank)

    def is_first(self, rank: int, phase: int) -> bool:
        """True where micro-batches of this stream enter (inputs live here)."""
        return self.locate(rank, phase)[1] == 0

    def is_last(self, rank: int, phase: int) -> bool:
        """True where the path ends (labels and loss live here)."""
        stream, pos = self.locate(rank, phase)
        return pos == len(self.paths[stream]) - 1


def dualpipe_layout(num_ranks: int) -> Layout:
    """DualPipe: rank r holds ``S_r`` and ``S_{N-1-r}``; phase 0 is the direction
    in which r sits in the first half of the path."""
    n = num_ranks
    if n < 2 or n % 2:
        raise ValueError(f"DualPipe needs an even number of ranks >= 2, got {n}")
    half = n // 2
    down = tuple((r, 0 if r < half else 1) for r in range(n))
    up = tuple((n - 1 - k, 0 if n - 1 - k >= half else 1) for k in range(n))
    stage_ids = tuple(range(n))
    return Layout(
        num_ranks=n,
        paths=(down, up),
        stages=(stage_ids, stage_ids),
        rank_stages=tuple((r, n - 1 - r) for r in range(n)),
    )


def dualpipev_layout(num_ranks: int) -> Layout:
    """DualPipeV: rank r holds ``S_r`` (phase 0) and ``S_{2N-1-r}`` (phase 1)."""
    n = num_ranks
    if n < 1:
        raise ValueError(f"DualPipeV needs at least 1 rank, got {n}")
    path = tuple((r, 0) for r in range(n)) + tuple((r, 1) for r in reversed(range(n)))
    return Layout(
        num_ranks=n,
        paths=(path,),
        stages=(tuple(range(2 * n)),),
        rank_stages=tuple((r, 2 * n - 1 - r) for r in range(n)),
    )


def linear_layout(num_ranks: int) -> Layout:
    """One stage per rank, one direction (GPipe, 1F1B, ZB1P)."""
    n = num_ranks
    if n < 1:
        raise ValueError(f"a pipeline needs at least 1 rank, got {n}")
    return Layout(
        num_ranks=n,
        paths=(tuple((r, 0) for r in range(n)),),
        stages=(tuple(range(n)),),
        rank_stages=tuple((r,) for r in range(n)),
    )


def interleaved_layout(num_ranks: int, stages_per_rank: int = 2) -> Layout:
    """Looped placement (Megatron's virtual stages): ``v = stages_per_rank`` stages per
    rank, rank r holds ``S_r, S_{r+N}, ..., S_{r+(v-1)N}`` as phases ``0 .. v-1``; one
    stream runs ``S_0 .. S_{vN-1}``, passing from rank N-1 back to rank 0 between loops."""
    n, v = num_ranks, stages_per_rank
    if n < 1:
        raise ValueError(f"a pipeline needs at least 1 rank, got {n}")
    if v < 1:
        raise ValueError(f"stages per rank must be >= 1, got {v}")
    return Layout(
        num_ranks=n,
        paths=(tuple((s % n, s // n) for s in range(n * v)),),
        stages=(tuple(range(n * v)),),
        rank_stages=tuple(tuple(r + k * n for k in range(v)) for r in range(n)),
    )
