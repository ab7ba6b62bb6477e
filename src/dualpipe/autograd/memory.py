"""What a stage holds for its backward, measured: saved activations and deferred weight-gradient
state, in bytes and in units of one stage's activations for one micro-batch."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .split import backward_input

__all__ = ["StorageTracker", "TrackCreated", "StageMemory", "measure_stage_memory",
           "deferred_fraction"]


class StorageTracker:
    """Follows tensor storages until they are freed (weak references, never keeping one
    alive) and sums the bytes of those still alive."""

    __slots__ = ("_refs",)

    def __init__(self) -> None:
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def add(self, t: Tensor) -> None:
        """Follow ``t``'s storage (once; views of one storage count once)."""
        if not isinstance(t, Tensor) or t.is_meta or t.layout is not torch.strided:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensors
            return
        ref = StorageWeakRef(storage)
        if ref.cdata not in self._refs:
            self._refs[ref.cdata] = (ref, storage.nbytes())

    def held(self, exclude: Iterable[Tensor] = ()) -> int:
        """Bytes of the followed storages still alive, less those of ``exclude``
        (e.g. parameters' ``.grad``); forgets the freed ones."""
        skip = set()
        for t in exclude:
            if isinstance(t, Tensor) and t.layout is torch.strided:
                skip.add(StorageWeakRef(t.untyped_storage()).cdata)
        total = 0
        dead = []
        for key, (ref, nbytes) in self._refs.items():
            if ref.expired():
                dead.append(key)
            elif key not in skip:
                total += nbytes
        for key in dead:
            del self._refs[key]
        return total

    def clear(self) -> None:
        """Forget everything followed so far."""
        self._refs.clear()


class TrackCreated(TorchDispatchMode):
    """While active (on this thread), every tensor an operation creates is followed by
    ``tracker``. On CPU the autograd engine runs backward operations on the calling
    thread, so they are seen too; on CUDA use the allocator's statistics instead."""

    def __init__(self, tracker: StorageTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.tracker.add(t)
        return out


@dataclass(frozen=True)
class StageMemory:
    """What one forward of a stage leaves for its backward, and what its input-only
    backward leaves for the weight gradient.

    Attributes:
        activation_bytes: bytes a forward holds for the backward (the saved activations,
            the stage's input among them when the backward reads it): the unit.
        deferred_bytes: bytes the deferred weight-gradient work holds between the input
            backward and the ``W`` (what the weight side saved, the captured gradients).
        after_weight_bytes: bytes still held after the ``W`` (0 when all is freed).
    """

    activation_bytes: int
    deferred_bytes: int
    after_weight_bytes: int

    @property
    def fraction(self) -> float:
        """``deferred_bytes`` in units of ``activation_bytes`` (``Costs.w_memory``)."""
        return self.deferred_bytes / self.activation_bytes if self.activation_bytes else 0.0


def _held(tracker: StorageTracker, params: list[Tensor], device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":  # pragma: no cover - measured on GPUs
        torch.cuda.synchronize(device)
        return int(torch.cuda.memory_allocated(device))
    return tracker.held([*params, *(p.grad for p in params if p.grad is not None)])


def measure_stage_memory(
    stage: nn.Module | Callable[..., Any],
    *inputs: Tensor,
    input_grad: bool = True,
) -> StageMemory:
    """Run one forward, input-only backward and weight backward of ``stage`` on
    ``inputs`` (one micro-batch) and measure what each leaves held.

    The inputs are copied (with ``requires_grad`` set when ``input_grad``, as the
    runtime sets it on a received activation; False measures a first stage, whose
    input gets no gradient). Parameters' gradients are accumulated as in a step (zero
    them afterwards if that matters). On CPU every storage created is followed until
    freed (:class:`TrackCreated`); on CUDA the allocator's count of allocated bytes is
    used (run nothing else meanwhile).
    """
    params: list[Tensor] = list(stage.parameters()) if isinstance(stage, nn.Module) else []
    device = inputs[0].device if inputs else torch.device("cpu")
    tracker = StorageTracker()
    base = _held(tracker, params, device) if device.type == "cuda" else 0
    xs = [t.detach().clone().requires_grad_(input_grad and t.is_floating_point()) for t in inputs]
    for t in xs:
        tracker.add(t)
    del t
    with TrackCreated(tracker):
        out = stage(*xs)
        outs = [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)]
        roots = [torch.autograd.graph.get_gradient_edge(t) for t in outs if t.requires_grad]
        grads = [torch.randn_like(t) for t in outs if t.requires_grad]
    del out, outs
    leaves = [x for x in xs if x.requires_grad]
    del xs
    activation = _held(tracker, params, device) - base
    # the output gradients arrive with the backward: not part of the forward's unit
    grad_bytes = sum(g.untyped_storage().nbytes() for g in grads)
    activation -= grad_bytes
    with TrackCreated(tracker):
        in_grads, work = backward_input(roots, grads, leaves)
    work.release_unread_inputs()  # as the runtime does with a received activation
    del roots, grads, in_grads, leaves
    deferred = _held(tracker, params, device) - base
    with TrackCreated(tracker):
        work.run()
    del work
    after = _held(tracker, params, device) - base
    return StageMemory(activation, deferred, after)


def deferred_fraction(stage: nn.Module | Callable[..., Any], *inputs: Tensor,
                      input_grad: bool = True) -> float:
    """What one deferred weight gradient of ``stage`` holds, as a fraction of its
    activations for one micro-batch (``Costs.w_memory`` for this stage); see
    :func:`measure_stage_memory`."""
    return measure_stage_memory(stage, *inputs, input_grad=input_grad).fraction
