"""The :class:`Schedule` record: a layout plus, per rank, an ordered list of steps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ScheduleError
from .actions import Action, Step, parse_step, step_actions
from .layout import Layout

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """What every rank runs, in order.

    Attributes:
        name: generator name (``dualpipe``, ``dualpipev``, ``1f1b``, ``zb1p``,
            ``gpipe``) or ``custom``.
        layout: where each stage lives.
        chunks_per_stream: micro-batches per stream (``C``). The whole step has
            ``num_chunks = C * layout.num_streams`` micro-batches.
        steps: per rank, the ordered steps.
    """

    name: str
    layout: Layout
    chunks_per_stream: int
    steps: tuple[tuple[Step, ...], ...]

    def __post_init__(self) -> None:
        if len(self.steps) != self.layout.num_ranks:
            raise ScheduleError(
                f"schedule has {len(self.steps)} rank lists for {self.layout.num_ranks} ranks"
            )

    @property
    def num_ranks(self) -> int:
        """Processes in the pipeline group."""
        return self.layout.num_ranks

    @property
    def num_chunks(self) -> int:
        """Micro-batches of one step, all streams together."""
        return self.chunks_per_stream * self.layout.num_streams

    def actions(self, rank: int) -> Iterator[Action]:
        """The actions of ``rank`` in issue order (pairs split forward-then-backward)."""
        for step in self.steps[rank]:
            yield from step_actions(step)

    def global_chunk(self, rank: int, action: Action) -> int:
        """Index of ``action``'s micro-batch in the whole step (stream-major)."""
        stream, _ = self.layout.locate(rank, action.phase)
        return stream * self.chunks_per_stream + action.chunk

    def to_text(self) -> str:
        """``rank R: TOKEN TOKEN ...``, one line per rank."""
        return "\n".join(
            f"rank {r}: " + " ".join(str(s) for s in steps) for r, steps in enumerate(self.steps)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (layout and tokens)."""
        return {
            "name": self.name,
            "num_ranks": self.num_ranks,
            "num_chunks": self.num_chunks,
            "chunks_per_stream": self.chunks_per_stream,
            "paths": [[list(p) for p in path] for path in self.layout.paths],
            "stages": [list(s) for s in self.layout.stages],
            "rank_stages": [list(s) for s in self.layout.rank_stages],
            "ranks": [[str(s) for s in steps] for steps in self.steps],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`."""
        layout = Layout(
            num_ranks=int(data["num_ranks"]),
            paths=tuple(tuple((int(r), int(p)) for r, p in path) for path in data["paths"]),
            stages=tuple(tuple(int(s) for s in st) for st in data["stages"]),
            rank_stages=tuple(tuple(int(s) for s in st) for st in data["rank_stages"]),
        )
        steps = tuple(tuple(parse_step(t) for t in rank) for rank in data["ranks"])
        return cls(str(data.get("name", "custom")), layout, int(data["chunks_per_stream"]), steps)

    @classmethod
    def from_text(
        cls, text: str, layout: Layout, chunks_per_stream: int | None = None, name: str = "custom"
    ) -> Schedule:
        """Parse ``rank R: TOKEN ...`` lines (as :meth:`to_text` prints) onto ``layout``.

        ``chunks_per_stream`` defaults to one more than the largest micro-batch id.
        """
        rows: dict[int, tuple[Step, ...]] = {}
        for lineno, line in enumerate(text.strip().splitlines(), 1):
            head, sep, body = line.partition(":")
            words = head.split()
            if not sep or len(words) != 2 or words[0] != "rank" or not words[1].isdigit():
                raise ScheduleError(f"line {lineno}: expected 'rank R: TOKEN ...', got {line!r}")
            try:
                rows[int(words[1])] = tuple(parse_step(t) for t in body.split())
            except ValueError as exc:
                raise ScheduleError(f"line {lineno}: {exc}") from None
        if sorted(rows) != list(range(layout.num_ranks)):
            raise ScheduleError(f"expected lines for ranks 0..{layout.num_ranks - 1}")
        steps = tuple(rows[r] for r in range(layout.num_ranks))
        if chunks_per_stream is None:
            ids = [a.chunk for rank in steps for s in rank for a in step_actions(s)]
            chunks_per_stream = 1 + max(ids, default=-1)
        return cls(name, layout, chunks_per_stream, steps)

