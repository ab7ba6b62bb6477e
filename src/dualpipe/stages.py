"""The stage modules a pipeline holds on this rank, by global stage index, and which rank
owns each stage (DualPipe holds every stage on two ranks; the lower one owns it)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .runtime.pipeline import Pipeline
from .schedules.layout import Layout

__all__ = [
    "local_stages",
    "stage_owner",
    "unique_parameters",
    "owned_parameters",
    "is_mirrored",
]


def local_stages(pipe: Pipeline) -> list[tuple[int, nn.Module]]:
    """``(stage index, module)`` of every module this rank passed to ``pipe``, sorted by
    stage index (so ranks holding the same stages list them in the same order)."""
    ids = pipe.layout.rank_stages[pipe.rank]
    return sorted(zip(ids, pipe.module, strict=True), key=lambda item: item[0])


def stage_owner(layout: Layout, stage: int) -> int:
    """The lowest pipeline rank that holds ``stage``."""
    return min(r for r, ids in enumerate(layout.rank_stages) if stage in ids)


def unique_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Parameters of ``modules`` in order, each once (a tied weight appears once)."""
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


COUNTED_ELSEWHERE = "_dualpipe_counted_elsewhere"
"""A parameter with this attribute set to True is a copy of one that another rank holds
and counts (a tied output head whose embedding lives on another rank, kept equal by
summing their gradients): :func:`owned_parameters` leaves it out."""


def owned_parameters(pipe: Pipeline) -> list[nn.Parameter]:
    """The parameters of the stages this rank owns: over the pipeline's ranks, every
    parameter of the model exactly once (DualPipe's second copies left out, and copies
    marked :data:`COUNTED_ELSEWHERE`)."""
    return [
        p
        for p in unique_parameters(
            m for k, m in local_stages(pipe) if stage_owner(pipe.layout, k) == pipe.rank
        )
        if not getattr(p, COUNTED_ELSEWHERE, False)
    ]


def is_mirrored(pipe: Pipeline) -> bool:
    """Whether ``pipe`` holds every stage on two ranks (DualPipe)."""
    return pipe.mirrored is not None
