"""Memory a rank holds during a recorded step, sampled after every action (CPU: every
storage the step creates, followed until freed; CUDA: the allocator's statistics)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..autograd.memory import StorageTracker, TrackCreated

__all__ = ["MemoryProbe"]


class MemoryProbe:
    """Held bytes of one step on one rank.

    On CPU every tensor an operation of the step creates on this thread is followed
    until freed, less the parameters, their gradients, the step's input batch and the
    buffers of messages (sends in flight, receives posted and not yet taken, local
    hand-offs between the rank's stages): what stays is what the actions hold, saved
    activations and deferred weight-gradient state (and the losses). This costs a
    Python call per operation: only in steps recorded with ``record="memory"``. On CUDA the
    allocator's allocated bytes are read (less what was allocated when the step began).
    """

    def __init__(self, modules: Iterable[nn.Module], data: Iterable[Any],
                 device: torch.device) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.data = [t for t in data if isinstance(t, Tensor)]
        self.device = device
        self.cuda = device.type == "cuda"
        self.tracker = StorageTracker()
        self._mode: TrackCreated | None = None
        self.base = 0

    def __enter__(self) -> MemoryProbe:
        if self.cuda:  # pragma: no cover - measured on GPUs
            self.base = int(torch.cuda.memory_allocated(self.device))
        else:
            self._mode = TrackCreated(self.tracker)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None

    def held(self, buffers: Iterable[Tensor] = ()) -> int:
        """Bytes held now, less the storages of ``buffers`` (messages in flight, posted
        receives, local hand-offs: not the saved activations or deferred state of any
        action; CPU only)."""
        if self.cuda:  # pragma: no cover - measured on GPUs
            return max(0, int(torch.cuda.memory_allocated(self.device)) - self.base)
        grads = [p.grad for p in self.params if p.grad is not None]
        return self.tracker.held([*self.params, *grads, *self.data, *buffers])
