"""The schedule registry: every named schedule's generator, layout and constraints, once.

Generators register themselves with :func:`register`; everything that lists,
checks or builds schedules by name (``generate``, ``layout_for``, the CLI, the
comparison table, :class:`~dualpipe.runtime.pipeline.Pipeline`) asks here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ScheduleError
from .layout import Layout
from .schedule import Schedule

__all__ = [
    "Generator",
    "ScheduleSpec",
    "register",
    "spec",
    "specs",
    "schedule_names",
    "generate",
    "layout_for",
    "SCHEDULES",
]

Generator = Callable[[int, int], Schedule]
"""``generator(num_ranks, num_chunks) -> Schedule``."""


@dataclass(frozen=True)
class ScheduleSpec:
    """One named schedule.

    Attributes:
        name: registry name (lower case, as the CLI and ``Pipeline`` take it).
        label: display name (``DualPipeV``).
        generator: ``generator(num_ranks, num_chunks)``; checks :meth:`check` first.
        layout: ``layout(num_ranks)``: where the stages live.
        description: one line for listings.
        rank_multiple: the number of ranks must be a multiple of this.
        min_ranks: fewest ranks.
        chunk_multiple: ``num_chunks`` must be a multiple of this.
        extra: further rule on ``(num_ranks, num_chunks)``: returns what is wrong, or None.
        extra_text: that rule in words (for :attr:`constraints`).
        compare: a row of ``python -m dualpipe compare``.
    """

    name: str
    label: str
    generator: Generator
    layout: Callable[[int], Layout]
    description: str
    rank_multiple: int = 1
    min_ranks: int = 1
    chunk_multiple: int = 1
    extra: Callable[[int, int], str | None] | None = None
    extra_text: str = ""
    compare: bool = True

    def check_ranks(self, num_ranks: int) -> None:
        """Raise :class:`ScheduleError` unless ``num_ranks`` suits this schedule."""
        _check_positive(self.name, num_ranks, "ranks")
        if num_ranks % self.rank_multiple:
            raise ScheduleError(
                f"{self.name}: the number of ranks must be {_multiple(self.rank_multiple)},"
                f" got {num_ranks}"
            )
        if num_ranks < self.min_ranks:
            raise ScheduleError(
                f"{self.name}: needs at least {self.min_ranks} ranks, got {num_ranks}"
            )

    def check(self, num_ranks: int, num_chunks: int) -> None:
        """Raise :class:`ScheduleError` unless a schedule of these sizes exists."""
        self.check_ranks(num_ranks)
        _check_positive(self.name, num_chunks, "chunks")
        if num_chunks % self.chunk_multiple:
            raise ScheduleError(
                f"{self.name}: num_chunks must be {_multiple(self.chunk_multiple)},"
                f" got {num_chunks}"
            )
        if self.extra is not None:
            problem = self.extra(num_ranks, num_chunks)
            if problem:
                raise ScheduleError(f"{self.name}: {problem}")

    @property
    def constraints(self) -> str:
        """The constraints in words (empty when any sizes work)."""
        parts = []
        if self.rank_multiple > 1:
            parts.append(f"ranks {_multiple(self.rank_multiple)}")
        if self.min_ranks > 1:
            parts.append(f"ranks >= {self.min_ranks}")
        if self.chunk_multiple > 1:
            parts.append(f"micro-batches {_multiple(self.chunk_multiple)}")
        if self.extra_text:
            parts.append(self.extra_text)
        return "; ".join(parts)


def _multiple(k: int) -> str:
    return "even" if k == 2 else f"a multiple of {k}"


def _check_positive(name: str, value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ScheduleError(f"{name}: {what} must be a positive integer, got {value!r}")


LISTING_ORDER = (
    "dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe", "zbv", "v-half", "v-min", "interleaved-1f1b",
)
"""The order every listing shows; schedules not named here follow in registration order."""

_SPECS: dict[str, ScheduleSpec] = {}

SCHEDULES: dict[str, Generator] = {}
"""Generator of every named schedule: ``SCHEDULES[name](num_ranks, num_chunks)``."""


def register(
    name: str,
    *,
    label: str,
    layout: Callable[[int], Layout],
    description: str,
    rank_multiple: int = 1,
    min_ranks: int = 1,
    chunk_multiple: int = 1,
    extra: Callable[[int, int], str | None] | None = None,
    extra_text: str = "",
    compare: bool = True,
) -> Callable[[Generator], Generator]:
    """Decorator: register ``build(num_ranks, num_chunks)`` under ``name``.

    The decorated function checks the constraints first (a clear
    :class:`ScheduleError` names the one that fails), then builds.
    """

    def wrap(build: Generator) -> Generator:
        @functools.wraps(build)
        def checked(num_ranks: int, num_chunks: int) -> Schedule:
            entry.check(num_ranks, num_chunks)
            return build(num_ranks, num_chunks)

        entry = ScheduleSpec(
            name=name,
            label=label,
            generator=checked,
            layout=layout,
            description=description,
            rank_multiple=rank_multiple,
            min_ranks=min_ranks,
            chunk_multiple=chunk_multiple,
            extra=extra,
            extra_text=extra_text,
            compare=compare,
        )
        if name in _SPECS:
            raise ValueError(f"schedule {name!r} registered twice")
        _SPECS[name] = entry
        SCHEDULES[name] = checked
        _put_in_order()
        return checked

    return wrap




def _put_in_order() -> None:
    """Reorder :data:`SCHEDULES` (and the specs) by :data:`LISTING_ORDER`."""
    registered = list(_SPECS)
    names = sorted(registered, key=lambda n: (
        LISTING_ORDER.index(n) if n in LISTING_ORDER else len(LISTING_ORDER), registered.index(n)))
    ordered = {n: _SPECS[n] for n in names}
    _SPECS.clear()
    _SPECS.update(ordered)
    SCHEDULES.clear()
    SCHEDULES.update((n, entry.generator) for n, entry in ordered.items())


def schedule_names() -> tuple[str, ...]:
    """Every registered name, in listing order (:data:`LISTING_ORDER`)."""
    return tuple(_SPECS)


def specs() -> tuple[ScheduleSpec, ...]:
    """Every registered schedule, in listing order."""
    return tuple(_SPECS.values())


def spec(name: str) -> ScheduleSpec:
    """The registered schedule ``name`` (case-insensitive)."""
    try:
        return _SPECS[name.lower()]
    except (KeyError, AttributeError):
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {', '.join(_SPECS)}"
        ) from None


def generate(name: str, num_ranks: int, num_chunks: int) -> Schedule:
    """Build the named schedule on ``num_ranks`` ranks for ``num_chunks`` micro-batches."""
    return spec(name).generator(num_ranks, num_chunks)


def layout_for(name: str, num_ranks: int) -> Layout:
    """The layout the named schedule uses on ``num_ranks`` ranks (checked first)."""
    entry = spec(name)
    entry.check_ranks(num_ranks)
    return entry.layout(num_ranks)
