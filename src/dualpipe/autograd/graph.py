"""Graph analysis of a split backward: where the weight-gradient work is cut off."""

from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import Node

from .engine import ACCUMULATE_GRAD, has_saved, is_custom, leaf_tensor

__all__ = ["Graph", "Cut", "slot_list", "find", "group_sources", "conflicts", "activation_ends"]

# --------------------------------------------------------------------------------------
# Graph analysis for backward_input
# --------------------------------------------------------------------------------------


class Graph:
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


def slot_list(mask: int) -> list[int]:
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


class Cut:
    """Classification of the graph into the input pass and the deferred weight pass."""

    __slots__ = ("is_i", "frontier", "levels", "croots", "oroots", "comps", "params")

    def __init__(
        self,
        g: Graph,
        targets: list[bool],
        root_nodes: list[int],
        captures: tuple[int, ...] = (),
    ) -> None:
        kids, post, nodes = g.kids, g.post, g.nodes
        n = len(nodes)
        # capture nodes: given (a first stage's activation-side ends, see
        # ``activation_ends``) and added by the analysis
        capture: set[int] = set(captures)
        for c in captures:
            targets[c] = True
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
                elif is_custom(nodes[i]):
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
                    elif type(nodes[i]) is ACCUMULATE_GRAD:
                        leaves.append(i)
            parent = list(range(nsrc))
            if shared:
                group_sources(srcs, parent)
                conflict = conflicts(g, targets, is_i, frontier, croots, srcs, parent)
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
            root = find(parent, (m & -m).bit_length() - 1)
            lst = params.get(root)
            if lst is None:
                params[root] = [leaf_tensor(nodes[j])]
            else:
                lst.append(leaf_tensor(nodes[j]))
        comps: dict[int, list[int]] = {}
        for s in range(nsrc):
            comps.setdefault(find(parent, s), []).append(s)
        self.is_i = is_i
        self.frontier = frontier
        self.levels = levels
        self.croots = croots
        self.oroots = oroots
        self.comps = comps
        self.params = params


def find(parent: list[int], s: int) -> int:
    while parent[s] != s:
        parent[s] = parent[parent[s]]
        s = parent[s]
    return s


def group_sources(srcs: list[int], parent: list[int]) -> None:
    """Union the sources that share a parameter-side node (union-find over ``parent``)."""
    for m in srcs:
        if m & (m - 1):
            first = (m & -m).bit_length() - 1
            m &= m - 1
            while m:
                s = (m & -m).bit_length() - 1
                a, b = find(parent, first), find(parent, s)
                if a != b:
                    parent[b] = a
                m &= m - 1


def conflicts(
    g: Graph,
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
        r = find(parent, s)
        group_bits[r] = group_bits.get(r, 0) | (1 << s)
    bad = set()
    for sid, (i, _) in enumerate(frontier):
        r = find(parent, sid)
        if reach[i] & group_bits[r]:
            bad.add(r)
    if not bad:
        return []
    nodes = g.nodes
    out = []
    for j, m in enumerate(srcs):
        if (
            m & (m - 1)
            and type(nodes[j]) is ACCUMULATE_GRAD
            and not (targets[j] or is_i[j])
            and find(parent, (m & -m).bit_length() - 1) in bad
        ):
            out.append(j)
    return out




def activation_ends(g: Graph) -> list[int]:
    """For a graph whose stage inputs get no gradient (a first stage): the nodes where the
    activation side ends, to be captured like stage inputs so that an input backward has
    work to do (and can free what only it reads).

    A *parameter chain* is an ``AccumulateGrad`` node, or a node that saves nothing and
    whose children are all parameter chains (a transpose, an expand, a view of a
    parameter). The activation side ends at the nodes that are not parameter chains but
    whose children all are: the first layer's ``AddmmBackward`` (its input got no
    gradient), an ``EmbeddingBackward``.
    """
    kids, nodes = g.kids, g.nodes
    chain = [False] * len(nodes)
    ends: list[int] = []
    for i in g.post:
        ks = kids[i]
        below = all(chain[j] for j, _, _ in ks)
        node = nodes[i]
        if type(node) is ACCUMULATE_GRAD or (
            ks and below and not is_custom(node) and not has_saved(node)
        ):
            chain[i] = True
        elif below:
            ends.append(i)
    return ends
