"""The split backward of one stage and micro-batch: input gradients now, weight work later."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from .deferral import EngineCall, Sink, WeightGradStore, WeightGradWork
from .engine import (
    LEAF,
    NODE_KINDS,
    PLAIN_ONLY,
    accumulate,
    gradients,
    is_custom,
    leaf_tensor,
    node_kind,
    release_saved,
)
from .graph import Cut, Graph, activation_ends, slot_list

__all__ = ["backward_full", "backward_input"]

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _roots(
    outputs: Sequence[Tensor | GradientEdge], grad_outputs: Sequence[Tensor | None]
) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs gradient flows from, with their gradients.

    Outputs that do not require grad are skipped. A ``None`` gradient means implicit ones
    for a one-element output (the loss); for any other output it means "no gradient", and
    the output is skipped.
    """
    if len(outputs) != len(grad_outputs):
        raise ValueError(f"got {len(outputs)} outputs but {len(grad_outputs)} grad_outputs")
    outs: list[Tensor] = []
    grads: list[Tensor] = []
    for k, (out, grad) in enumerate(zip(outputs, grad_outputs, strict=True)):
        if isinstance(out, GradientEdge):
            # a released output: only its place in the graph is kept (no shape to check)
            if grad is not None:
                outs.append(out)  # type: ignore[arg-type]
                grads.append(grad)
            continue
        if not isinstance(out, Tensor) or not out.requires_grad:
            continue
        if grad is None:
            if out.numel() != 1:
                continue
            grad = torch.ones_like(out, memory_format=torch.preserve_format)
        elif grad.shape != out.shape:
            raise RuntimeError(
                f"Mismatch in shape: grad_outputs[{k}] has a shape of {tuple(grad.shape)} "
                f"and outputs[{k}] has a shape of {tuple(out.shape)}"
            )
        elif grad.dtype.is_complex != out.dtype.is_complex:
            raise RuntimeError(
                f"grad_outputs[{k}] ({grad.dtype}) and outputs[{k}] ({out.dtype}) must both "
                "be real or both be complex"
            )
        outs.append(out)
        grads.append(grad)
    return outs, grads


def _grad_inputs(inputs: Sequence[Tensor]) -> list[Tensor]:
    """The distinct stage inputs that require grad (they must be leaves)."""
    seen: set[int] = set()
    req: list[Tensor] = []
    for t in inputs:
        if isinstance(t, Tensor) and t.requires_grad:
            if t.grad_fn is not None:
                raise ValueError(
                    "stage inputs that require grad must be leaf tensors (detach the "
                    "received activation and call requires_grad_())"
                )
            if id(t) not in seen:
                seen.add(id(t))
                req.append(t)
    return req


def _edge(out: Tensor | GradientEdge) -> GradientEdge:
    """The graph position of an output (outputs may be given as tensors or edges)."""
    return out if isinstance(out, GradientEdge) else get_gradient_edge(out)


def _root_node(out: Tensor | GradientEdge) -> Node:
    if isinstance(out, GradientEdge):
        return out.node
    fn = out.grad_fn
    return fn if fn is not None else get_gradient_edge(out).node


# --------------------------------------------------------------------------------------
# backward_full
# --------------------------------------------------------------------------------------


def backward_full(
    outputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
) -> list[Tensor | None]:
    """Full backward of one stage for one micro-batch, in one autograd engine call.

    Accumulates into ``.grad`` of every parameter (every leaf reached that is not in
    ``inputs``) like ``loss.backward()``, frees the graph, and returns the gradients w.r.t.
    ``inputs`` aligned with them (``None`` where no gradient reaches or the input does not
    require grad). The inputs' ``.grad`` is left as it was.

    Args:
        outputs: the stage outputs, as tensors or as their ``GradientEdge`` (so a sent
            activation can be freed before its backward; an edge needs a gradient).
        grad_outputs: their gradients; ``None`` means implicit ones for a one-element output
            (the loss) and "no gradient" for any other output.
        inputs: the stage inputs: leaf tensors (typically detached received activations);
            those with ``requires_grad=False`` get ``None``.
    """
    req = _grad_inputs(inputs)
    outs, grads = _roots(outputs, grad_outputs)
    if not outs:
        return [None] * len(inputs)
    return _plain_backward(outs, grads, req, inputs, None)


def _plain_backward(
    outs: list[Tensor],
    grads: list[Tensor],
    req: list[Tensor],
    inputs: Sequence[Tensor],
    queue: list[Callable[[], None]] | None,
) -> list[Tensor | None]:
    """One plain engine call; the input gradients are taken from (and removed from) the
    inputs' ``.grad``, which is restored afterwards."""
    saved = [(t, t.grad) for t in req]
    for t in req:
        t.grad = None
    got: dict[int, Tensor | None] = {}
    try:
        with Sink(queue):
            accumulate(outs, grads, None)
    finally:
        for t, old in saved:
            got[id(t)] = t.grad
            t.grad = old
    return [got.get(id(t)) if isinstance(t, Tensor) else None for t in inputs]


# --------------------------------------------------------------------------------------
# backward_input
# --------------------------------------------------------------------------------------


def backward_input(
    outputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
) -> tuple[list[Tensor | None], WeightGradWork]:
    """Input-only backward of one stage for one micro-batch.

    Meanwhile :class:`~dualpipe.utils.WeightGradStore` is enabled: the functions custom
    Functions put there join the returned work (after its own).

    Returns the gradients w.r.t. ``inputs`` (the same values :func:`backward_full` returns)
    and a :class:`WeightGradWork` holding the parameter-gradient work, which is not done
    here (see the module docstring for what is deferred and the few cases where part of it
    cannot be). No parameter ``.grad`` is touched except in those cases, and the inputs'
    ``.grad`` is never touched. With no input requiring grad, nothing runs now: the whole
    backward is deferred.

    Args:
        outputs: the stage outputs, as tensors or as their ``GradientEdge`` (so a sent
            activation can be freed before its backward; an edge needs a gradient).
        grad_outputs: their gradients; ``None`` means implicit ones for a one-element output
            (the loss) and "no gradient" for any other output.
        inputs: the stage inputs: leaf tensors (typically detached received activations);
            those with ``requires_grad=False`` get ``None``.
    """
    stored: list[Callable[[], None]] = []
    with WeightGradStore.collect(stored):
        grads, work = _split(outputs, grad_outputs, inputs)
    work._fns.extend(stored)
    return grads, work


def _split(
    outputs: Sequence[Tensor | GradientEdge],
    grad_outputs: Sequence[Tensor | None],
    inputs: Sequence[Tensor],
) -> tuple[list[Tensor | None], WeightGradWork]:
    """:func:`backward_input` without the :class:`~dualpipe.utils.WeightGradStore`."""
    req = _grad_inputs(inputs)
    outs, grads = _roots(outputs, grad_outputs)
    results: list[Tensor | None] = [None] * len(inputs)
    if not outs:
        return results, WeightGradWork()
    root_nodes = [_root_node(o) for o in outs]
    g = Graph([(node, _edge(o).output_nr) for node, o in zip(root_nodes, outs, strict=True)])
    nodes = g.nodes
    input_ids = {id(t) for t in req}
    targets: list[bool] = []
    plain_only = False
    kinds = NODE_KINDS
    for node in nodes:
        kind = kinds.get(type(node))
        if kind is None:
            kind = node_kind(type(node))
        if kind == LEAF:
            targets.append(id(leaf_tensor(node)) in input_ids)
        else:
            targets.append(False)
            if kind == PLAIN_ONLY:
                plain_only = True
    if plain_only:
        # Cannot be split (reentrant checkpointing computes its parameter gradients inside
        # its own backward and refuses autograd.grad): plain backward now, exact; only the
        # defer_weight_grad work is deferred.
        fns: list[Callable[[], None]] = []
        return _plain_backward(outs, grads, req, inputs, fns), WeightGradWork([], fns)
    root_idx = [g.index[node] for node in root_nodes]
    # No input gets a gradient (a first stage): the input backward still runs the
    # activation side down to where it ends (the first layer), so that W holds only what
    # the weight side reads.
    ends = tuple(activation_ends(g)) if not req else ()
    cut = Cut(g, targets, root_idx, ends)
    is_i = cut.is_i
    if not req and not any(is_i):
        # Nothing to compute now: the whole backward is weight work.
        edges = [_edge(o) for o in outs]
        return results, WeightGradWork([(edges, grads, None)])

    # Input pass: roots that reach a target; captures at every frontier input slot.
    in_outs = [o for o, r in zip(outs, root_idx, strict=True) if is_i[r] or targets[r]]
    in_grads = [gr for gr, r in zip(grads, root_idx, strict=True) if is_i[r] or targets[r]]
    cap_edges: list[GradientEdge] = []
    cap_pos: list[tuple[int, int]] = []  # (frontier number, slot) per captured edge
    for f, (i, _) in enumerate(cut.frontier):
        node = nodes[i]
        for s in slot_list(g.slots[i]):
            cap_edges.append(GradientEdge(node, s))
            cap_pos.append((f, s))
    # Capture nodes deferred as a whole: collect what their parents send them with
    # post-hooks (raw values, before the node's tensor hooks), plus output gradients.
    buffers: dict[tuple[int, int], Tensor] = {}
    handles = []
    keepalive: list[Any] = []
    if cut.croots:
        croot_set = set(cut.croots)
        for o, gr, r in zip(outs, grads, root_idx, strict=True):
            if r in croot_set:
                key = (r, _edge(o).output_nr)
                old = buffers.get(key)
                buffers[key] = gr if old is None else old + gr
        for c in cut.croots:
            for s in slot_list(g.slots[c]):
                cap_edges.append(GradientEdge(nodes[c], s))
        specs: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        parents: dict[int, list[int]] = {}
        for i in g.post:
            if is_i[i]:
                for j, s, pos in g.kids[i]:
                    if j in croot_set:
                        specs.setdefault(i, []).append((pos, (j, s)))
                        parents.setdefault(j, []).append(i)
        for i, spec in specs.items():
            handles.append(nodes[i].register_hook(_collector(spec, buffers)))
        for c in cut.croots:
            if is_custom(nodes[c]):
                # A Python node is owned by the C++ nodes pointing to it, not by its Python
                # object: keep one of those (or, failing that, the outputs' nodes) alive.
                owners = [nodes[i] for i in parents.get(c, ()) if not is_custom(nodes[i])]
                if owners:
                    keepalive.append(owners[0])
                else:
                    keepalive.extend(_edge(o) for o in outs)
    fns = []
    captured: list[list[tuple[int, Tensor | None]]] = [[] for _ in cut.frontier]
    if in_outs:
        try:
            with Sink(fns):
                res = gradients(in_outs, in_grads, [*req, *cap_edges])
        finally:
            for h in handles:
                h.remove()
        # The input pass is done: nodes of the input side that are not frontier nodes
        # never run again, so the tensors they saved (a GELU's input, attention scores,
        # a norm's statistics) are freed now; the frontier nodes and the weight side keep
        # theirs for the weight pass.
        frontier_ids = {i for i, _ in cut.frontier}
        for i, node in enumerate(nodes):
            if is_i[i] and i not in frontier_ids:
                release_saved(node)
        got = {id(t): res[k] for k, t in enumerate(req)}
        for k, t in enumerate(inputs):
            if isinstance(t, Tensor) and t.requires_grad:
                results[k] = got[id(t)]
        base = len(req)
        for k, (f, s) in enumerate(cap_pos):
            captured[f].append((s, res[base + k]))
    else:
        for h in handles:
            h.remove()

    # Deferred calls. A group of sources sharing parameter-side nodes is one call rooted at
    # all of them with inputs= their parameters; single frontier nodes that do not reach one
    # another (same level, e.g. parallel experts or projections) share a call; all
    # parameter-side roots (whole capture nodes, parameter-only outputs) make one call.
    nf, nc = len(cut.frontier), len(cut.croots)
    calls: list[EngineCall] = []
    by_level: dict[int, EngineCall] = {}
    p_roots: list[GradientEdge] = []
    p_grads: list[Tensor] = []
    for comp, members in cut.comps.items():
        roots: list[GradientEdge] = []
        rgrads: list[Tensor] = []
        has_frontier = False
        for sid in members:
            if sid < nf:
                has_frontier = True
                node = nodes[cut.frontier[sid][0]]
                for s, cap in captured[sid]:
                    if cap is not None:
                        roots.append(GradientEdge(node, s))
                        rgrads.append(cap)
            elif sid < nf + nc:
                c = cut.croots[sid - nf]
                for s in slot_list(g.slots[c]):
                    buffered = buffers.get((c, s))
                    if buffered is not None:
                        roots.append(GradientEdge(nodes[c], s))
                        rgrads.append(buffered)
            else:
                r = cut.oroots[sid - nf - nc]
                for o, out_grad, ri in zip(outs, grads, root_idx, strict=True):
                    if ri == r:
                        roots.append(_edge(o))
                        rgrads.append(out_grad)
        if not roots:
            continue
        if not has_frontier:
            p_roots.extend(roots)
            p_grads.extend(rgrads)
            continue
        params = cut.params.get(comp)
        if not params:
            continue
        if len(members) > 1:
            calls.append((roots, rgrads, params))
            continue
        call = by_level.get(cut.levels[members[0]])
        if call is None:
            by_level[cut.levels[members[0]]] = (roots, rgrads, params)
        else:
            call[0].extend(roots)
            call[1].extend(rgrads)
            call[2].extend(params)  # type: ignore[union-attr]
    # Last layers first, as a plain backward would.
    calls.extend(by_level[level] for level in sorted(by_level, reverse=True))
    if p_roots:
        calls.append((p_roots, p_grads, None))
    work = WeightGradWork(calls, fns, keepalive)
    # Stage inputs whose leaf node no frontier node points to: no node of the deferred
    # work saved them as they are (only input-side nodes read them, and those are freed).
    # A custom Function may hand its saved input to deferred work (defer_weight_grad,
    # WeightGradStore): its inputs are kept too.
    readers = [i for i, _ in cut.frontier]
    readers.extend(i for i, node in enumerate(nodes) if is_i[i] and is_custom(node))
    frontier_kids = {j for i in readers for j, _, _ in g.kids[i]}
    for t in req:
        at = g.index.get(get_gradient_edge(t).node)
        if at is not None and at not in frontier_kids:
            work._unread.append(t)
    return results, work


def _collector(
    spec: list[tuple[int, tuple[int, int]]], buffers: dict[tuple[int, int], Tensor]
) -> Callable[[Sequence[Tensor | None], Sequence[Tensor | None]], None]:
    """A node post-hook adding the node's outputs at ``spec`` positions into ``buffers``."""

    def hook(grad_inputs: Sequence[Tensor | None], grad_outputs: Sequence[Tensor | None]) -> None:
        for pos, key in spec:
            gr = grad_inputs[pos]
            if gr is not None:
                old = buffers.get(key)
                buffers[key] = gr if old is None else old + gr

    return hook
