"""Extensions: plug-ins that a :class:`~dualpipe.runtime.pipeline.Pipeline` calls at fixed
points of every step (data-parallel wrappers such as FSDP2 use them); the runtime imports
none of them.

A plug-in registers a factory with :func:`register_extension`; every pipeline calls each
registered factory once at construction with itself, and keeps the extensions the
factories return (a factory returns ``None`` when it has nothing to do for that pipeline).
The pipeline then calls, on every rank:

* :meth:`Extension.attach` during construction, before the ranks' handshake and
  DualPipe's mirrored-copy check (it may refuse the pipeline by raising, with an error
  that says what to do: whether each rank refused is compared in the handshake, so every
  rank's construction fails at once, the refusing rank's with its own error);
* :meth:`Extension.before_step` before the step's first action;
* :meth:`Extension.after_stage_backward` during a training step, right after the action
  that finishes the last backward or weight-gradient work of one of the rank's stages
  (derived from the rank's plan: the last ``B``, ``I`` or ``W`` of that stage; pairs
  count as their step);
* :meth:`Extension.after_step` after the step (after DualPipe's mirrored gradient sum);
* :meth:`Extension.step_failed` instead of ``after_step`` when the step failed;
* :meth:`Extension.close` when the pipeline is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Extension", "ExtensionFactory", "register_extension", "extension_factories",
           "unregister_extension"]


class Extension:
    """Base class of pipeline extensions: every hook is a no-op by default."""

    def attach(self, pipeline: Pipeline) -> None:
        """Called once during the pipeline's construction (raise to refuse it); the
        pipeline's modules, layout, rank and executor exist, its handshake has not run."""

    def before_step(self, training: bool) -> None:
        """Called before every step (``training`` is False for forward-only inference)."""

    def after_stage_backward(self, stage_index: int) -> None:
        """Training steps only: the rank's module ``pipeline.module[stage_index]`` has
        finished every backward and weight-gradient action of the step."""

    def after_step(self, training: bool) -> None:
        """Called after every step that completed."""

    def step_failed(self) -> None:
        """Called instead of :meth:`after_step` when the step failed (restore state; no
        communication: the pipeline is failed and the other ranks may be gone)."""

    def close(self) -> None:
        """Called when the pipeline is closed."""


ExtensionFactory = Callable[["Pipeline"], "Extension | None"]
"""``factory(pipeline) -> Extension | None``, called at every pipeline construction."""

_FACTORIES: list[ExtensionFactory] = []


def register_extension(factory: ExtensionFactory) -> ExtensionFactory:
    """Call ``factory(pipeline)`` at every pipeline construction from now on (registering
    the same factory twice has no effect). Returns the factory (usable as a decorator)."""
    if factory not in _FACTORIES:
        _FACTORIES.append(factory)
    return factory


def unregister_extension(factory: ExtensionFactory) -> None:
    """Stop calling ``factory`` (no error if it was not registered)."""
    if factory in _FACTORIES:
        _FACTORIES.remove(factory)


def extension_factories() -> tuple[ExtensionFactory, ...]:
    """The registered factories, in registration order."""
    return tuple(_FACTORIES)
