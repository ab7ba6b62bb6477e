"""The one place that calls torch's private autograd engine entry and reads node types."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

__all__ = [
    "ACCUMULATE_GRAD", "NODE_KINDS", "accumulate", "gradients", "leaf_tensor", "is_custom",
    "node_kind", "LEAF", "PLAIN_ONLY", "OTHER", "saved_names", "release_saved", "has_saved",
]

ACCUMULATE_GRAD: type = type(get_gradient_edge(torch.empty(0, requires_grad=True)).node)
_CUSTOM_TYPES: dict[type, bool] = {}

try:
    # What torch.autograd.backward/grad call after validating their arguments. Every call
    # made here has validated (or engine-produced) gradients, so the Python-side checks of
    # the public functions (about 10 us per call) are skipped when this is available.
    from torch.autograd.graph import _engine_run_backward

    ENGINE_RUN: Callable[..., Any] | None = _engine_run_backward
except ImportError:  # pragma: no cover - older or newer torch
    ENGINE_RUN = None


def accumulate(
    roots: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor] | None,
    retain_graph: bool = False,
) -> None:
    """``torch.autograd.backward(roots, grads, inputs=inputs)`` (one engine call)."""
    if ENGINE_RUN is not None:
        ENGINE_RUN(
            tuple(roots),
            tuple(grads),
            retain_graph,
            False,
            tuple(inputs) if inputs else (),
            allow_unreachable=True,
            accumulate_grad=True,
        )
    else:  # pragma: no cover
        torch.autograd.backward(
            roots, grads, retain_graph=retain_graph, inputs=inputs  # type: ignore[arg-type]
        )


def gradients(
    roots: Sequence[Tensor], grads: Sequence[Tensor], targets: Sequence[Tensor | GradientEdge]
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(..., retain_graph=True, allow_unused=True)`` (one engine call)."""
    if ENGINE_RUN is not None:
        return ENGINE_RUN(
            tuple(roots),
            tuple(grads),
            True,
            False,
            tuple(targets),
            allow_unreachable=True,
            accumulate_grad=False,
        )
    return torch.autograd.grad(  # pragma: no cover
        roots, targets, grads, retain_graph=True, allow_unused=True  # type: ignore[arg-type]
    )


def leaf_tensor(node: Node) -> Tensor:
    """The tensor an ``AccumulateGrad`` node accumulates into."""
    leaf: Tensor = node.variable  # type: ignore[attr-defined]  # AccumulateGrad only
    return leaf


def is_custom(node: Node) -> bool:
    """Whether ``node`` is the backward node of a Python custom autograd Function."""
    t = type(node)
    flag = _CUSTOM_TYPES.get(t)
    if flag is None:
        flag = _CUSTOM_TYPES[t] = issubclass(t, BackwardCFunction)
    return flag


NODE_KINDS: dict[type, int] = {}
OTHER, LEAF, PLAIN_ONLY = 0, 1, 2


def _donates_buffers(forward_cls: Any) -> bool:
    """Whether ``forward_cls`` is a ``torch.compile``-d (AOTAutograd) region whose compiled
    backward frees ("donates") its saved buffers: it refuses to run in an engine call that
    retains the graph."""
    meta = getattr(forward_cls, "metadata", None)
    if not getattr(meta, "bw_donated_idxs", None):
        return False
    try:
        from torch._functorch import config
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(config, "donated_buffer", False))


def node_kind(t: type) -> int:
    """``LEAF`` for AccumulateGrad; ``PLAIN_ONLY`` for nodes that only work under a plain
    ``backward()`` (reentrant checkpointing refuses ``autograd.grad``; a compiled region
    with donated buffers refuses ``retain_graph=True``); else ``OTHER``."""
    kind = NODE_KINDS.get(t)
    if kind is None:
        from torch.utils.checkpoint import CheckpointFunction

        forward_cls = getattr(t, "_forward_cls", object)
        if t is ACCUMULATE_GRAD:
            kind = LEAF
        elif issubclass(t, BackwardCFunction) and (
            issubclass(forward_cls, CheckpointFunction) or _donates_buffers(forward_cls)
        ):
            kind = PLAIN_ONLY
        else:
            kind = OTHER
        NODE_KINDS[t] = kind
    return kind




_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def saved_names(t: type) -> tuple[str, ...]:
    """The attributes through which nodes of type ``t`` expose their saved tensors
    (``_raw_saved_*``; a custom Function's ``_raw_saved_tensors``)."""
    names = _SAVED_NAMES.get(t)
    if names is None:
        names = _SAVED_NAMES[t] = tuple(a for a in dir(t) if a.startswith("_raw_saved_"))
    return names


def has_saved(node: Node) -> bool:
    """Whether ``node``'s type can hold saved tensors."""
    return bool(saved_names(type(node)))


def _released(_: object) -> Tensor:
    raise RuntimeError(
        "dualpipe: a tensor saved by an input-side autograd node was released after the input "
        "backward (backward_input), but the node ran again; please report this graph"
    )


def _drop(_: Tensor) -> None:
    return None


def release_saved(node: Node) -> int:
    """Free the tensors ``node`` saved for its backward (it must never run again): each
    saved tensor gets a pack hook that drops it (``SavedTensor.register_hooks``), so the
    node no longer references it. Saved tensors that already have hooks (the user's
    ``saved_tensors_hooks``) are left alone. Returns how many were released."""
    count = 0
    for name in saved_names(type(node)):
        try:
            raw = getattr(node, name)
        except RuntimeError:  # already freed
            continue
        for saved in raw if isinstance(raw, (tuple, list)) else (raw,):
            if saved is None:
                continue
            try:
                saved.register_hooks(_drop, _released)
            except RuntimeError:  # None, already freed, or the user's hooks hold it
                continue
            count += 1
    return count
