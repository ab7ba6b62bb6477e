"""The automatic weight-gradient split: input gradients now, weight gradients later, for any
stage of ordinary autograd operations (design and limits: docs/autograd.md)."""

from __future__ import annotations

from .deferral import WeightGradStore, WeightGradWork, defer_weight_grad
from .split import backward_full, backward_input

__all__ = [
    "WeightGradStore",
    "WeightGradWork",
    "backward_full",
    "backward_input",
    "defer_weight_grad",
]
