"""What crosses each stage boundary: the tensor metadata received and sent, and the
receive buffers allocated from it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import PipelineError
from ..schedules.messages import Message
from ..transport.wire import HEADER_LEN, TensorMeta
from .declared import Declared

__all__ = ["BoundaryShapes"]

Boundary = tuple[int, int]
"""``(stream, producing position)``."""


@dataclass
class BoundaryShapes:
    """Metadata per boundary: ``received`` (activations arriving here, from headers)
    and ``sent`` (activations this rank sent; their gradients come back the same way).

    With ``static`` the shapes are the ones of an earlier step, and a change is an error
    that says so. With ``declared`` (the original's ``set_p2p_tensor_shapes`` /
    ``set_p2p_tensor_dtype``) what is sent must match the declaration."""

    received: dict[Boundary, list[TensorMeta]] = field(default_factory=dict)
    sent: dict[Boundary, list[TensorMeta]] = field(default_factory=dict)
    static: bool = False
    declared: Declared | None = None

    def copy(self) -> BoundaryShapes:
        """An independent copy (the cache of a static-shape pipeline stays untouched)."""
        return BoundaryShapes(dict(self.received), dict(self.sent), self.static, self.declared)

    def buffers(self, msg: Message, device: torch.device) -> list[torch.Tensor] | None:
        """Empty receive buffers for ``msg``, or None while its shapes are unknown."""
        if msg.header:
            return [torch.empty(HEADER_LEN, dtype=torch.int64, device=device)]
        if msg.grad:
            metas = self.sent.get((msg.stream, msg.position - 1))
            if metas is None:
                return None
            return [torch.empty(m.shape, dtype=m.dtype, device=device)
                    for m in metas if m.requires_grad]
        metas = self.received.get((msg.stream, msg.position))
        if metas is None:
            return None
        return [torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas]

    def note_sent(self, boundary: Boundary, metas: list[TensorMeta], chunk: int) -> None:
        """Record what micro-batch ``chunk`` sends across ``boundary``; every micro-batch
        (and, when static, every step) must send the same."""
        known = self.sent.get(boundary)
        if known is None:
            problem = self.declared.mismatch(metas) if self.declared is not None else None
            if problem is not None:
                raise PipelineError(problem)
            self.sent[boundary] = metas
        elif known != metas:
            raise PipelineError(
                f"micro-batch {chunk} produced tensors {metas} where "
                f"{'an earlier step' if self.static else 'micro-batch 0'} produced "
                f"{known}: all micro-batches of a step must have the same shapes"
                + (" (and with static_shapes=True, of every step)" if self.static else "")
            )
