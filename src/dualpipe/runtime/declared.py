"""Boundary shapes and dtype declared with the original's ``set_p2p_tensor_shapes`` and
``set_p2p_tensor_dtype``: optional here (shapes are discovered), checked when given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..transport.wire import TensorMeta

__all__ = ["Declared", "declared", "set_p2p_tensor_dtype", "set_p2p_tensor_shapes"]


@dataclass(frozen=True)
class Declared:
    """What every stage boundary carries, per micro-batch: the shapes of its tensors, in
    order, and their dtype (``None``: not declared)."""

    shapes: tuple[tuple[int, ...], ...] | None = None
    dtype: torch.dtype | None = None

    def mismatch(self, metas: Sequence[TensorMeta]) -> str | None:
        """Why ``metas`` (the tensors a stage sends) contradict the declaration, or None."""
        got = tuple(tuple(m.shape) for m in metas)
        if self.shapes is not None and got != self.shapes:
            return (
                f"a stage sends tensors of shapes {list(got)} but set_p2p_tensor_shapes "
                f"declared {list(self.shapes)}"
            )
        if self.dtype is not None:
            dtypes = [m.dtype for m in metas]
            if any(dt != self.dtype for dt in dtypes):
                return (
                    f"a stage sends tensors of dtypes {dtypes} but set_p2p_tensor_dtype "
                    f"declared {self.dtype}"
                )
        return None


_declared = Declared()


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """The original's declaration of the per-micro-batch shapes of the tensors that cross
    every stage boundary (e.g. ``[(micro_batch, seq_len, hidden)]``).

    Optional here: shapes are discovered at run time. Pipelines built afterwards check
    the declaration on their first step (a clear error if a stage sends other shapes) and
    turn on ``static_shapes`` (no metadata messages after the first step)."""
    global _declared
    fixed = tuple(tuple(int(n) for n in shape) for shape in shapes)
    _declared = Declared(fixed, _declared.dtype)


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """The original's declaration of the dtype of the tensors that cross stage boundaries.

    Optional here: dtypes are discovered. Pipelines built afterwards check it on their
    first step."""
    global _declared
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"set_p2p_tensor_dtype expects a torch.dtype, got {dtype!r}")
    _declared = Declared(_declared.shapes, dtype)


def declared() -> Declared:
    """The current declaration (what a pipeline built now will check)."""
    return _declared
