"""The runtime's registration point: plug-ins (the overlap engine, parallelism
integrations) extend a pipeline through :class:`Extension` objects."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..schedules.layout import Layout
from .kernels import Kernels
from .plan import ExecutionPlan, PlannedStep

__all__ = ["PipelineInfo", "Extension", "ExtensionFactory", "register_extension",
           "unregister_extension", "registered_extensions", "extensions_for", "BUNDLED"]


@dataclass(frozen=True)
class PipelineInfo:
    """What a plug-in may know of the pipeline it extends (one rank's view).

    Attributes:
        rank, num_ranks: this pipeline rank and the pipeline's size.
        schedule: the schedule's name.
        layout: where every stage lives.
        modules: this rank's stage modules, in ``layout.rank_stages[rank]`` order.
        stages: the global stage index of each of ``modules``.
        group: the pipeline's process group (None: the default group).
        device: where the modules live.
        split_backward: whether input-only backwards defer their weight work.
        pipeline: the pipeline module itself (an ``nn.Module``; read-only use).
    """

    rank: int
    num_ranks: int
    schedule: str
    layout: Layout
    modules: tuple[nn.Module, ...]
    stages: tuple[int, ...]
    group: dist.ProcessGroup | None
    device: torch.device
    split_backward: bool
    pipeline: nn.Module


class Extension:
    """A plug-in's hooks into one pipeline; every method is optional (no-op here).

    The runtime calls them on every rank, from the thread that runs the step, and
    treats an exception from any of them like a failing action (every rank is told).
    """

    name = "extension"
    """Shown in errors and listings."""

    pairs = False
    """Whether this plug-in runs a pair of two forwards or two backwards faster than its
    halves one after the other (the overlap engine does): then a pipeline with
    ``pairs=None`` makes such pairs (:func:`dualpipe.pairing.pair_steps`)."""

    def kernels(self, table: Kernels) -> Kernels:
        """The dispatch table with this plug-in's kernels in (``table.replace(...)``)."""
        return table

    def step_plan(self, plan: ExecutionPlan) -> None:
        """At the start of each step, right before :meth:`before_step`: the rank's plan
        of the step. The ``step`` arguments of the action hooks that follow are
        ``plan.steps``, in order (e.g. to look further ahead than ``following``)."""

    def before_step(self, training: bool) -> None:
        """At the start of each step, before any message of it."""

    def before_action(self, step: PlannedStep) -> None:
        """Before each step of the rank's list runs (its inputs have arrived)."""

    def after_action(self, step: PlannedStep, following: PlannedStep | None) -> None:
        """After each step of the rank's list ran; ``following`` is the next one (None
        after the last), e.g. to prefetch what it needs."""

    def after_stage_backward(self, module: int) -> None:
        """Right after the step's last gradient work (``B`` or ``W``) of the rank's module
        ``module`` (an index into :attr:`PipelineInfo.modules`)."""

    def after_step(self, training: bool) -> None:
        """After every action of the step ran and every send was delivered."""

    def step_failed(self) -> None:
        """Instead of :meth:`after_step` when the step failed: restore state, without
        communication (the pipeline has failed; other ranks may be gone)."""

    def close(self) -> None:
        """Release what the plug-in holds (with the pipeline)."""


ExtensionFactory = Callable[[PipelineInfo], "Extension | None"]
"""``factory(info)``: the plug-in's extension for this pipeline, or None when it has
nothing to do there. It may raise to refuse a pipeline it cannot run exactly."""

_FACTORIES: list[ExtensionFactory] = []

BUNDLED = ("dualpipe.overlap", "dualpipe.integrations")
"""Plug-ins that ship with the library, loaded (and so registered) at the first pipeline:
the runtime names them as data, the way package entry points would, and never imports
them itself."""

_loaded = False


def register_extension(factory: ExtensionFactory) -> ExtensionFactory:
    """Register ``factory``: every pipeline built from now on asks it (usable as a
    decorator; registering the same factory twice has no effect)."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)
    return factory


def unregister_extension(factory: ExtensionFactory) -> None:
    """Stop asking ``factory`` (no error if it was not registered)."""
    if factory in _FACTORIES:
        _FACTORIES.remove(factory)


def registered_extensions() -> tuple[ExtensionFactory, ...]:
    """Every registered factory, bundled plug-ins included, in registration order."""
    global _loaded
    if not _loaded:
        for name in BUNDLED:
            importlib.import_module(name)
        _loaded = True
    return tuple(_FACTORIES)


def extensions_for(info: PipelineInfo, extra: Sequence[Extension] = ()) -> list[Extension]:
    """The extensions of one pipeline: those the registered factories return, then
    ``extra`` (the user's own)."""
    found = [ext for factory in registered_extensions() if (ext := factory(info)) is not None]
    return [*found, *extra]
