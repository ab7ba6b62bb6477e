"""Integrations with PyTorch's data-parallel wrappers, registered as pipeline extensions
(:mod:`dualpipe.runtime.extension`) when this package is imported (``import dualpipe``
imports it; nothing here imports torch until a pipeline is built).

* :mod:`dualpipe.integrations.fsdp`: stages wrapped in FSDP2 (``fully_shard``, HSDP) or
  FSDP2's ``replicate``: one gradient reduction per stage and step, after the stage's
  last backward or weight-gradient action.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..runtime.extension import Extension, register_extension

if TYPE_CHECKING:
    from ..runtime.pipeline import Pipeline

__all__ = ["fsdp_extension"]


def fsdp_extension(pipeline: Pipeline) -> Extension | None:
    """The factory of :mod:`dualpipe.integrations.fsdp` (None when no stage of
    ``pipeline`` contains an FSDP2 module)."""
    from .fsdp import extension_for

    return extension_for(pipeline)


register_extension(fsdp_extension)
