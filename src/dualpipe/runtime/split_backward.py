"""Split ("zero-bubble") backward for one pipeline stage and one micro-batch.

DualPipe and DualPipeV overlap work by splitting the backward of a stage in two:

* the *input* backward (``B``) computes the gradients w.r.t. the stage inputs, which the
  previous stage is waiting for, and as little of the parameter-gradient work as possible;
* the *weight* backward (``W``) does the rest later, whenever the schedule has a bubble.

This module does the split for any stage made of ordinary autograd ops, with no custom
autograd Functions required and no recomputation:

``backward_full(outputs, grad_outputs, inputs)``
    Plain backward (one engine call), returning the input gradients.
``backward_input(outputs, grad_outputs, inputs)``
    Returns the same input gradients and a :class:`WeightGradWork` holding the rest.
``WeightGradWork.run()``
    Performs the deferred work once, accumulating into the parameters' ``.grad``.
``defer_weight_grad(fn)``
    Explicit deferral for custom autograd Functions; the original DualPipe's
    ``WeightGradStore.put`` (:mod:`dualpipe.utils`) is honoured the same way.

How the split works
-------------------
The autograd graph reachable from the outputs is walked once (linear in its size). A node is
an *I-node* if a stage input (or a *capture node*, see below) is reachable from it; every
other node reaches only parameters (any leaf that is not a stage input) and is a *P-node*.
A *frontier* node is an I-node with an edge into a P-node, e.g. the ``AddmmBackward`` of a
``Linear``: one of its edges leads to the input, the others to the weight and the bias.

``backward_input`` runs one ``torch.autograd.grad`` call whose ``inputs`` are the stage
inputs plus a :class:`~torch.autograd.graph.GradientEdge` for every input slot of every
frontier node. The engine then only computes what leads to those targets: each frontier node
computes only its input-side outputs (``AddmmBackward`` does the ``grad @ W`` matmul but not
``x.T @ grad``) and no P-node runs; the gradients flowing into the frontier nodes are
captured. ``WeightGradWork.run`` then makes, per frontier node ``X``, an engine call rooted
at ``X``'s captured gradients with ``inputs=`` the parameters behind ``X``'s P-edges: the
engine computes only ``X``'s parameter-side outputs and runs the P-only subgraph below
them, accumulating into ``.grad`` through the ordinary ``AccumulateGrad`` nodes (so
``.grad`` layout, parameter hooks and post-accumulate hooks behave as in ``loss.backward()``).
Frontier nodes that cannot reach one another (same number of frontier nodes below them on
the input side: parallel projections, MoE experts) share one call, so a chain of ``L``
layers costs about ``L`` engine calls however wide each layer is. Outputs that depend only
on parameters are roots of one more call. The total work of ``backward_input`` + ``run``
equals one plain backward: nothing is computed twice (the one visible difference: a fused
kernel such as ``native_layer_norm_backward`` is launched once per pass, each time with
half of its outputs masked off).

Cases that need care (all handled, all exact):

* *Shared weight-side nodes* (``w1, w2 = W.chunk(2)`` used by two frontier nodes that do not
  depend on each other): the frontier nodes sharing a P-node are grouped into one deferred
  engine call so the shared subgraph runs once.
* *Weight used on both sides of a frontier node* (``h = x @ W; y = h @ W``, one ``Linear``
  applied twice, a shared bias, ...): a deferred call rooted at the later use would re-run
  the input chain down to the earlier use and count it twice. This is detected (a
  frontier reaching, through its input-side edges, another source of the same weight) and
  the shared parameters become *capture nodes*: their gradient is completed during the
  input backward (captured at their ``AccumulateGrad`` and accumulated in ``run``). Cost of
  this fallback: none in FLOPs (no recomputation), but the weight-gradient work of the
  affected parameters is not deferred (it runs in ``backward_input``); only the
  accumulation into ``.grad`` is.
* *Custom autograd Functions* (Python ``backward``) on the input side whose inputs include
  parameter-side tensors: re-running them in the weight pass would call the user's backward
  twice, so they are atomic: they run once, in the input backward, and the gradients on
  their parameter-side edges are captured there (their children become capture nodes). Use
  :func:`defer_weight_grad` inside such a backward to defer its weight work explicitly.
  A ``torch.compile``-d region is such a Function (its weight gradients are not deferred).
* *Compiled regions with donated buffers.* AOTAutograd's compiled backward may free its
  saved buffers as it runs ("donated buffers", on by default) and then refuses any engine
  call that retains the graph, which the input pass must do. A graph containing such a
  region gets a plain backward in ``backward_input`` (exact, like reentrant checkpointing
  below; nothing of its weight work could be deferred anyway: the compiled backward
  computes input and weight gradients in one kernel graph). Eager layers in the same
  stage are then not split either: compile whole stages, or compile with
  ``torch._functorch.config.donated_buffer=False`` to keep the split for the eager rest.
* *Non-reentrant activation checkpointing* (``checkpoint(..., use_reentrant=False)``) is
  ordinary autograd and splits like the rest. *Reentrant* checkpointing computes parameter
  gradients inside its own backward and refuses ``autograd.grad``: a graph containing it
  gets a plain backward in ``backward_input`` (exact, nothing but the
  :func:`defer_weight_grad` work deferred).

Gradients captured at capture nodes are collected with post-hooks on their parent nodes, so
a tensor hook registered on such a node's tensor (e.g. ``param.register_hook``) is applied
exactly once to the value; it is *called* once more during ``backward_input`` (with the same
incoming gradient, its result discarded). Tensor hooks on the outputs of frontier nodes are
likewise called in both passes and applied once per use, exactly as in a plain backward.

Memory: after ``backward_input`` the handle holds the frontier nodes (and thereby the part
of the graph below them), their captured gradients and the parameters to accumulate;
autograd nodes above the topmost frontier node are not referenced, so their saved tensors
go as soon as the caller drops the outputs. The tensors saved by input-side nodes below a
frontier node (e.g. the input of a GELU between two Linears) stay alive until ``run``: the
input pass has to keep the graph (the frontier nodes run again in ``run``), and the engine
cannot free the saved tensors of only some of the nodes it ran. The weight pass runs with
``retain_graph=False``, so saved tensors are freed node by node, and ``run`` drops every
reference afterwards. ``backward_full`` does not retain the graph.

Cost: one Python walk of the graph per ``backward_input`` (about 1 us per node), one engine
call for the input pass and one per level of frontier nodes for the weight pass. Each such
call walks the graph below its roots in C++, so a stage with ``L`` sequential layers pays
``O(L * nodes)`` cheap C++ node visits in total: negligible next to real layer sizes, but it
makes the split's fixed overhead grow with the depth of very deep, very small stages.

Limitation: an intermediate tensor on which ``retain_grad()`` was called and that is an
output of a frontier node (e.g. the output of a ``Linear`` inside the stage) gets its
``.grad`` set in the input pass and accumulated again in ``run`` (twice the value); the
retained-grad hook cannot be told apart from Python. Parameter and input gradients are
unaffected.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ..utils import WeightGradStore, run_weight_grad_fns

__all__ = [
    "WeightGradWork",
    "backward_full",
    "backward_input",
    "defer_weight_grad",
]

_ACCUMULATE_GRAD: type = type(get_gradient_edge(torch.empty(0, requires_grad=True)).node)
_CUSTOM_TYPES: dict[type, bool] = {}

try:
    # What torch.autograd.backward/grad call after validating their arguments. Every call
    # made here has validated (or engine-produced) gradients, so the Python-side checks of
    # the public functions (about 10 us per call) are skipped when this is available.
    from torch.autograd.graph import _engine_run_backward

    _ENGINE_RUN: Callable[..., Any] | None = _engine_run_backward
except ImportError:  # pragma: no cover - older or newer torch
    _ENGINE_RUN = None


def _accumulate(
    roots: Sequence[Tensor | GradientEdge],
    grads: Sequence[Tensor],
    inputs: Sequence[Tensor] | None,
    retain_graph: bool = False,
) -> None:
    """``torch.autograd.backward(roots, grads, inputs=inputs)`` (one engine call)."""
    if _ENGINE_RUN is not None:
        _ENGINE_RUN(
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


def _gradients(
    roots: Sequence[Tensor], grads: Sequence[Tensor], targets: Sequence[Tensor | GradientEdge]
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(..., retain_graph=True, allow_unused=True)`` (one engine call)."""
    if _ENGINE_RUN is not None:
        return _ENGINE_RUN(
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


def _leaf_tensor(node: Node) -> Tensor:
    """The tensor an ``AccumulateGrad`` node accumulates into."""
    leaf: Tensor = node.variable  # type: ignore[attr-defined]  # AccumulateGrad only
    return leaf


def _is_custom(node: Node) -> bool:
    """Whether ``node`` is the backward node of a Python custom autograd Function."""
    t = type(node)
    flag = _CUSTOM_TYPES.get(t)
    if flag is None:
        flag = _CUSTOM_TYPES[t] = issubclass(t, BackwardCFunction)
    return flag


_NODE_KINDS: dict[type, int] = {}
_OTHER, _LEAF, _PLAIN_ONLY = 0, 1, 2


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


def _node_kind(t: type) -> int:
    """``_LEAF`` for AccumulateGrad; ``_PLAIN_ONLY`` for nodes that only work under a plain
    ``backward()`` (reentrant checkpointing refuses ``autograd.grad``; a compiled region
    with donated buffers refuses ``retain_graph=True``); else ``_OTHER``."""
    kind = _NODE_KINDS.get(t)
    if kind is None:
        from torch.utils.checkpoint import CheckpointFunction

        forward_cls = getattr(t, "_forward_cls", object)
        if t is _ACCUMULATE_GRAD:
            kind = _LEAF
        elif issubclass(t, BackwardCFunction) and (
            issubclass(forward_cls, CheckpointFunction) or _donates_buffers(forward_cls)
        ):
            kind = _PLAIN_ONLY
        else:
            kind = _OTHER
        _NODE_KINDS[t] = kind
    return kind


# --------------------------------------------------------------------------------------
# Explicit deferral (defer_weight_grad)
# --------------------------------------------------------------------------------------


class _Sink:
    """Where ``defer_weight_grad`` sends work while a backward of this module runs."""

    __slots__ = ("queue",)

    def __init__(self, queue: list[Callable[[], None]] | None) -> None:
        # None: run the work immediately (backward_full, weight pass).
        self.queue = queue

    def __enter__(self) -> _Sink:
        with _SINK_LOCK:
            _SINKS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        with _SINK_LOCK:
            for i in range(len(_SINKS) - 1, -1, -1):
                if _SINKS[i] is self:
                    del _SINKS[i]
                    break


# A process-wide stack rather than a thread-local: on CUDA the autograd engine runs
# backward functions on its device threads, not on the thread that called backward.
_SINK_LOCK = threading.Lock()
_SINKS: list[_Sink] = []


def defer_weight_grad(fn: Callable[[], None]) -> None:
    """Defer weight-gradient work from inside a custom autograd Function's ``backward``.

    While :func:`backward_input` runs, ``fn`` is queued on the :class:`WeightGradWork` it
    returns and is called, once, by :meth:`WeightGradWork.run`. Anywhere else (inside
    :func:`backward_full`, during :meth:`WeightGradWork.run`, in a plain ``loss.backward()``)
    ``fn`` is called immediately. ``fn`` must do the accumulation itself, e.g.
    ``weight.grad = g if weight.grad is None else weight.grad + g``.

    The active split backward is tracked per process, not per thread (the autograd engine
    runs CUDA backward functions on its own threads), so run at most one
    :func:`backward_input` / :func:`backward_full` at a time per process.
    """
    if not callable(fn):
        raise TypeError(f"defer_weight_grad expects a callable, got {type(fn).__name__}")
    with _SINK_LOCK:
        sink = _SINKS[-1] if _SINKS else None
        if sink is not None and sink.queue is not None:
            sink.queue.append(fn)
            return
    fn()


# --------------------------------------------------------------------------------------
# Deferred work
# --------------------------------------------------------------------------------------

# One deferred engine call: root edges, their gradients, and the leaves to accumulate into
# (None: every leaf reached, used when the roots only reach parameters).
_Call = tuple[list[GradientEdge], list[Tensor], "list[Tensor] | None"]


class WeightGradWork:
    """The deferred part of a :func:`backward_input`: the weight-gradient work.

    :meth:`run` performs it exactly once, accumulating into the parameters' ``.grad``
    (through autograd's ``AccumulateGrad`` nodes, as ``loss.backward()`` would), then runs
    the functions queued with :func:`defer_weight_grad` or put in the
    :class:`~dualpipe.utils.WeightGradStore`, all under ``torch.no_grad()``, then drops every
    reference (autograd nodes, captured gradients), so the stage's remaining saved
    activations can be freed.
    Calling :meth:`run` a second time raises ``RuntimeError``.
    """

    __slots__ = ("_calls", "_fns", "_keepalive", "_done")

    def __init__(
        self,
        calls: list[_Call] | None = None,
        fns: list[Callable[[], None]] | None = None,
        keepalive: list[Any] | None = None,
    ) -> None:
        self._calls: list[_Call] = calls if calls is not None else []
        self._fns: list[Callable[[], None]] = fns if fns is not None else []
        self._keepalive: list[Any] = keepalive if keepalive is not None else []
        self._done = False

    @property
    def done(self) -> bool:
        """Whether :meth:`run` has been called."""
        return self._done

    @property
    def num_engine_calls(self) -> int:
        """How many autograd engine calls :meth:`run` will make (diagnostics)."""
        return len(self._calls)

    def run(self) -> None:
        """Perform the deferred weight-gradient work (once) and free its references."""
        if self._done:
            raise RuntimeError("WeightGradWork.run() was already called")
        self._done = True
        calls, fns = self._calls, self._fns
        self._calls, self._fns, self._keepalive = [], [], []
        # autograd off: hand-written accumulations (``w.grad += g.T @ x``) must not give
        # ``.grad`` a grad_fn (nor keep activations alive through one)
        with _Sink(None), torch.no_grad():
            for roots, grads, params in calls:
                _accumulate(roots, grads, params)
            calls.clear()
            run_weight_grad_fns(fns)
            fns.clear()

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return (
            f"WeightGradWork({state}, engine_calls={len(self._calls)}, "
            f"deferred_fns={len(self._fns)})"
        )


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
        with _Sink(queue):
            _accumulate(outs, grads, None)
    finally:
        for t, old in saved:
            got[id(t)] = t.grad
            t.grad = old
    return [got.get(id(t)) if isinstance(t, Tensor) else None for t in inputs]


# --------------------------------------------------------------------------------------
# Graph analysis for backward_input
# --------------------------------------------------------------------------------------


class _Graph:
    """The autograd graph reachable from the output nodes, as index lists."""

    __slots__ = ("index", "nodes", "kids", "post", "slots")

    def __init__(self, roots: list[tuple[Node, int]]) -> None:
        index: dict[Node, int] = {}
        nodes: list[Node] = []
        # kids[i]: (child index, child input slot, position in next_functions)
        kids: list[list[tuple[int, int, int]]] = []
        slots: list[int] = []  # bitmask of the input slots that receive an edge
        state: list[int] = []  # 0 discovered, 1 expanded, 2 finished
        post: list[int] = []  # children before parents
        stack: list[int] = []
        for node, slot in roots:
            i = index.get(node)
            if i is None:
                i = index[node] = len(nodes)
                nodes.append(node)
                kids.append([])
                slots.append(0)
                state.append(0)
                stack.append(i)
            slots[i] |= 1 << slot
            while stack:
                i = stack[-1]
                st = state[i]
                if st == 0:
                    state[i] = 1
                    ks = kids[i]
                    pos = 0
                    for child, s in nodes[i].next_functions:
                        if child is not None:
                            j = index.get(child)
                            if j is None:
                                j = index[child] = len(nodes)
                                nodes.append(child)
                                kids.append([])
                                slots.append(0)
                                state.append(0)
                                stack.append(j)
                            elif state[j] == 0:
                                stack.append(j)
                            slots[j] |= 1 << s
                            ks.append((j, s, pos))
                        pos += 1
                else:
                    stack.pop()
                    if st == 1:
                        state[i] = 2
                        post.append(i)
        self.index = index
        self.nodes = nodes
        self.kids = kids
        self.post = post
        self.slots = slots


def _slot_list(mask: int) -> list[int]:
    if mask == 1:
        return [0]
    out = []
    s = 0
    while mask:
        if mask & 1:
            out.append(s)
        mask >>= 1
        s += 1
    return out


class _Plan:
    """Classification of the graph into the input pass and the deferred weight pass."""

    __slots__ = ("is_i", "frontier", "levels", "croots", "oroots", "comps", "params")

    def __init__(self, g: _Graph, targets: list[bool], root_nodes: list[int]) -> None:
        kids, post, nodes = g.kids, g.post, g.nodes
        n = len(nodes)
        capture: set[int] = set()  # capture nodes added by the analysis
        while True:
            # I-nodes: a target (stage input or capture node) is reachable from them.
            # Frontier nodes: I-nodes with an edge into a P-node ("P-edges").
            is_i = [False] * n
            frontier: list[tuple[int, list[tuple[int, int, int]]]] = []
            # depth[i]: the most frontier nodes on one input-side path below and at i. Two
            # frontier nodes with the same depth below them do not reach one another.
            depth = [0] * n
            levels: list[int] = []
            added = False
            for i in post:
                ks = kids[i]
                for e in ks:
                    if targets[e[0]] or is_i[e[0]]:
                        break
                else:
                    continue
                is_i[i] = True
                below = 0
                pk = []
                for e in ks:
                    j = e[0]
                    if targets[j] or is_i[j]:
                        if depth[j] > below:
                            below = depth[j]
                    else:
                        pk.append(e)
                if not pk:
                    depth[i] = below
                elif _is_custom(nodes[i]):
                    # Atomic: its P-edges are completed in the input pass.
                    for e in pk:
                        targets[e[0]] = True
                        capture.add(e[0])
                    added = True
                else:
                    frontier.append((i, pk))
                    levels.append(below)
                    depth[i] = below + 1
            if added:
                continue
            croots = [c for c in sorted(capture) if not is_i[c]]
            oroots: list[int] = []
            for r in root_nodes:
                if not (targets[r] or is_i[r]) and r not in oroots:
                    oroots.append(r)
            # Sources of deferred work: frontier nodes, capture nodes that are not I-nodes
            # (deferred as a whole) and parameter-only outputs. srcs[j]: bitmask of the
            # sources whose parameter-side subgraph contains the P-node j.
            nsrc = len(frontier) + len(croots) + len(oroots)
            srcs = [0] * n
            sid = 0
            for _, pk in frontier:
                b = 1 << sid
                for e in pk:
                    srcs[e[0]] |= b
                sid += 1
            for c in croots:
                b = 1 << sid
                for e in kids[c]:
                    srcs[e[0]] |= b
                sid += 1
            for r in oroots:
                srcs[r] |= 1 << sid
                sid += 1
            shared = False
            leaves: list[int] = []
            for i in reversed(post):
                m = srcs[i]
                if m and not (targets[i] or is_i[i]):
                    if m & (m - 1):
                        shared = True
                    ks = kids[i]
                    if ks:
                        for e in ks:
                            srcs[e[0]] |= m
                    elif type(nodes[i]) is _ACCUMULATE_GRAD:
                        leaves.append(i)
            parent = list(range(nsrc))
            if shared:
                _group_sources(srcs, parent)
                conflict = _conflicts(g, targets, is_i, frontier, croots, srcs, parent)
                if conflict:
                    for j in conflict:
                        targets[j] = True
                        capture.add(j)
                    continue
            break
        # Parameters (non-input leaves) of each group of sources.
        params: dict[int, list[Tensor]] = {}
        for j in leaves:
            m = srcs[j]
            root = _find(parent, (m & -m).bit_length() - 1)
            lst = params.get(root)
            if lst is None:
                params[root] = [_leaf_tensor(nodes[j])]
            else:
                lst.append(_leaf_tensor(nodes[j]))
        comps: dict[int, list[int]] = {}
        for s in range(nsrc):
            comps.setdefault(_find(parent, s), []).append(s)
        self.is_i = is_i
        self.frontier = frontier
        self.levels = levels
        self.croots = croots
        self.oroots = oroots
        self.comps = comps
        self.params = params


def _find(parent: list[int], s: int) -> int:
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


def _group_sources(srcs: list[int], parent: list[int]) -> None:
    """Union the sources that share a parameter-side node (union-find over ``parent``)."""
    for m in srcs:
        if m & (m - 1):
            first = (m & -m).bit_length() - 1
            m &= m - 1
            while m:
                s = (m & -m).bit_length() - 1
                a, b = _find(parent, first), _find(parent, s)
                if a != b:
                    parent[b] = a
                m &= m - 1


def _conflicts(
    g: _Graph,
    targets: list[bool],
    is_i: list[bool],
    frontier: list[tuple[int, list[tuple[int, int, int]]]],
    croots: list[int],
    srcs: list[int],
    parent: list[int],
) -> list[int]:
    """Shared parameters whose deferred call would re-run an input-side chain.

    A deferred call rooted at a group of sources with ``inputs=`` their parameters executes
    exactly the roots and their parameter-side subgraphs unless a root reaches, through its
    input-side edges, another source of the same group (then that part would be counted
    twice). For such groups, the shared parameters become capture nodes.
    """
    kids, post = g.kids, g.post
    bit: dict[int, int] = {}
    for sid, (i, _) in enumerate(frontier):
        bit[i] = 1 << sid
    for k, c in enumerate(croots):
        bit[c] = 1 << (len(frontier) + k)
    # reach[i]: sources reachable from i through non-P nodes.
    reach = [0] * len(kids)
    for i in post:
        if targets[i] or is_i[i]:
            m = 0
            for j, _, _ in kids[i]:
                if targets[j] or is_i[j]:
                    m |= reach[j] | bit.get(j, 0)
            reach[i] = m
    group_bits: dict[int, int] = {}
    for s in range(len(parent)):
        r = _find(parent, s)
        group_bits[r] = group_bits.get(r, 0) | (1 << s)
    bad = set()
    for sid, (i, _) in enumerate(frontier):
        r = _find(parent, sid)
        if reach[i] & group_bits[r]:
            bad.add(r)
    if not bad:
        return []
    nodes = g.nodes
    out = []
    for j, m in enumerate(srcs):
        if (
            m & (m - 1)
            and type(nodes[j]) is _ACCUMULATE_GRAD
            and not (targets[j] or is_i[j])
            and _find(parent, (m & -m).bit_length() - 1) in bad
        ):
            out.append(j)
    return out


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
    if not req:
        # Nothing to compute now: the whole backward is weight work.
        edges = [_edge(o) for o in outs]
        return results, WeightGradWork([(edges, grads, None)])

    root_nodes = [_root_node(o) for o in outs]
    g = _Graph([(node, _edge(o).output_nr) for node, o in zip(root_nodes, outs, strict=True)])
    nodes = g.nodes
    input_ids = {id(t) for t in req}
    targets: list[bool] = []
    plain_only = False
    kinds = _NODE_KINDS
    for node in nodes:
        kind = kinds.get(type(node))
        if kind is None:
            kind = _node_kind(type(node))
        if kind == _LEAF:
            targets.append(id(_leaf_tensor(node)) in input_ids)
        else:
            targets.append(False)
            if kind == _PLAIN_ONLY:
                plain_only = True
    if plain_only:
        # Cannot be split (reentrant checkpointing computes its parameter gradients inside
        # its own backward and refuses autograd.grad): plain backward now, exact; only the
        # defer_weight_grad work is deferred.
        fns: list[Callable[[], None]] = []
        return _plain_backward(outs, grads, req, inputs, fns), WeightGradWork([], fns)
    root_idx = [g.index[node] for node in root_nodes]
    plan = _Plan(g, targets, root_idx)
    is_i = plan.is_i

    # Input pass: roots that reach a target; captures at every frontier input slot.
    in_outs = [o for o, r in zip(outs, root_idx, strict=True) if is_i[r] or targets[r]]
    in_grads = [gr for gr, r in zip(grads, root_idx, strict=True) if is_i[r] or targets[r]]
    cap_edges: list[GradientEdge] = []
    cap_pos: list[tuple[int, int]] = []  # (frontier number, slot) per captured edge
    for f, (i, _) in enumerate(plan.frontier):
        node = nodes[i]
        for s in _slot_list(g.slots[i]):
            cap_edges.append(GradientEdge(node, s))
            cap_pos.append((f, s))
    # Capture nodes deferred as a whole: collect what their parents send them with
    # post-hooks (raw values, before the node's tensor hooks), plus output gradients.
    buffers: dict[tuple[int, int], Tensor] = {}
    handles = []
    keepalive: list[Any] = []
    if plan.croots:
        croot_set = set(plan.croots)
        for o, gr, r in zip(outs, grads, root_idx, strict=True):
            if r in croot_set:
                key = (r, _edge(o).output_nr)
                old = buffers.get(key)
                buffers[key] = gr if old is None else old + gr
        for c in plan.croots:
            for s in _slot_list(g.slots[c]):
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
        for c in plan.croots:
            if _is_custom(nodes[c]):
                # A Python node is owned by the C++ nodes pointing to it, not by its Python
                # object: keep one of those (or, failing that, the outputs' nodes) alive.
                owners = [nodes[i] for i in parents.get(c, ()) if not _is_custom(nodes[i])]
                if owners:
                    keepalive.append(owners[0])
                else:
                    keepalive.extend(_edge(o) for o in outs)
    fns = []
    captured: list[list[tuple[int, Tensor | None]]] = [[] for _ in plan.frontier]
    if in_outs:
        try:
            with _Sink(fns):
                res = _gradients(in_outs, in_grads, [*req, *cap_edges])
        finally:
            for h in handles:
                h.remove()
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
    nf, nc = len(plan.frontier), len(plan.croots)
    calls: list[_Call] = []
    by_level: dict[int, _Call] = {}
    p_roots: list[GradientEdge] = []
    p_grads: list[Tensor] = []
    for comp, members in plan.comps.items():
        roots: list[GradientEdge] = []
        rgrads: list[Tensor] = []
        has_frontier = False
        for sid in members:
            if sid < nf:
                has_frontier = True
                node = nodes[plan.frontier[sid][0]]
                for s, cap in captured[sid]:
                    if cap is not None:
                        roots.append(GradientEdge(node, s))
                        rgrads.append(cap)
            elif sid < nf + nc:
                c = plan.croots[sid - nf]
                for s in _slot_list(g.slots[c]):
                    buffered = buffers.get((c, s))
                    if buffered is not None:
                        roots.append(GradientEdge(nodes[c], s))
                        rgrads.append(buffered)
            else:
                r = plan.oroots[sid - nf - nc]
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
        params = plan.params.get(comp)
        if not params:
            continue
        if len(members) > 1:
            calls.append((roots, rgrads, params))
            continue
        call = by_level.get(plan.levels[members[0]])
        if call is None:
            by_level[plan.levels[members[0]]] = (roots, rgrads, params)
        else:
            call[0].extend(roots)
            call[1].extend(rgrads)
            call[2].extend(params)  # type: ignore[union-attr]
    # Last layers first, as a plain backward would.
    calls.extend(by_level[level] for level in sorted(by_level, reverse=True))
    if p_roots:
        calls.append((p_roots, p_grads, None))
    return results, WeightGradWork(calls, fns, keepalive)


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
