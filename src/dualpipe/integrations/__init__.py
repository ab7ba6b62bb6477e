"""Integrations with PyTorch's data-parallel wrappers (FSDP2 ``fully_shard``, HSDP, FSDP2's
``replicate``), registered as pipeline extensions when this package is imported."""

from __future__ import annotations

from ..runtime.extension import Extension, PipelineInfo, register_extension

__all__ = ["fsdp_extension"]


@register_extension
def fsdp_extension(pipeline: PipelineInfo) -> Extension | None:
    """The extension of :mod:`dualpipe.integrations.fsdp` (None when no stage of the
    pipeline contains an FSDP2 module)."""
    from .fsdp import extension_for

    return extension_for(pipeline)
