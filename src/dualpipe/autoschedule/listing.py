"""List scheduling: simulate the pipeline and let each free rank pick its next step by a policy.

One run builds one schedule; :mod:`dualpipe.autoschedule.search` tries a family of policies.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..schedules.actions import Action, Op, Overlap, Step, step_actions
from ..schedules.dependency import dependency
from ..schedules.layout import Layout
from ..schedules.schedule import Schedule
from ..simulation import Costs, step_duration, w_state

__all__ = ["Policy", "list_schedule"]


@dataclass(frozen=True)
class Policy:
    """How the list scheduler picks a rank's next step among those whose inputs have arrived.

    Attributes:
        split: backwards are input-only (``I``) with their weight gradient deferred to a
            ``W`` that fills a later wait; False runs full backwards (``B``).
        pair: issue a ready forward and a ready backward as one overlapped pair whenever
            that is faster than running them one after the other (``fb < f + b``).
        deep_forward: among ready forwards, prefer the stage later on its path.
        deep_backward: among ready backwards, prefer the stage later on its path (earlier
            in the backward chain); False prefers the one that completes a micro-batch.
        backward_first: a ready backward goes before a ready forward.
        w_gap: a ``W`` fills a wait only if the next known arrival is at least
            ``w_gap * w`` away (0: always fill; larger values keep the rank free for it).
        pair_wait: a ready forward or backward waits for a partner to pair with if that
            partner arrives within ``pair_wait * (f + b - fb)`` (the time pairing saves).
        headroom: activation slots kept free below the limit when admitting a micro-batch
            to a rank for the first time (fewer warm-up forwards).
        max_deferred: most weight gradients a rank keeps deferred; beyond it backwards are
            full (``None``: no bound).
    """

    split: bool = True
    pair: bool = True
    deep_forward: bool = True
    deep_backward: bool = False
    backward_first: bool = True
    w_gap: float = 0.0
    pair_wait: float = 0.0
    headroom: int = 0
    max_deferred: int | None = None


_INF = float("inf")


@dataclass
class _Slot:
    """One stage position of one stream: where it runs and what it depends on."""

    rank: int
    phase: int
    stream: int
    pos: int
    prev: int  # slot whose forward this slot's forward needs; -1 at the path's start
    next: int  # slot whose backward this slot's backward needs; -1 at the path's end
    first_visit: bool  # the stream has not been on this rank earlier on its path


def _slots(layout: Layout) -> list[_Slot]:
    """Every stage position, with its neighbours taken from the dependency rule."""
    index: dict[tuple[int, int], int] = {}
    for stream, path in enumerate(layout.paths):
        for pos in range(len(path)):
            index[(stream, pos)] = len(index)

    def needs(rank: int, action: Action, op: Op) -> int:
        dep = dependency(layout, rank, action)
        return index[(dep.stream, dep.index)] if dep is not None and dep.op is op else -1

    slots: list[_Slot] = []
    for stream, path in enumerate(layout.paths):
        seen: set[int] = set()
        for pos, (rank, phase) in enumerate(path):
            slots.append(
                _Slot(
                    rank=rank,
                    phase=phase,
                    stream=stream,
                    pos=pos,
                    prev=needs(rank, Action(Op.FORWARD, phase, 0), Op.FORWARD),
                    next=needs(rank, Action(Op.BACKWARD, phase, 0), Op.BACKWARD),
                    first_visit=rank not in seen,
                )
            )
            seen.add(rank)
    return slots


def _revisits(layout: Layout) -> set[tuple[int, int]]:
    """``(stream, pos)`` whose rank appears again later on the stream's path."""
    out: set[tuple[int, int]] = set()
    for stream, path in enumerate(layout.paths):
        for pos, (rank, _) in enumerate(path):
            if any(r == rank for r, _ in path[pos + 1 :]):
                out.add((stream, pos))
    return out


def _template_moves(
    template: Schedule, slots: list[_Slot], chunks: int, split_pairs: bool
) -> list[list[tuple[int, int]]]:
    """Per rank, the template's non-W steps as (forward slot, backward slot), -1 for none;
    with ``split_pairs`` a pair becomes its forward then its backward."""
    where = {(s.rank, s.phase): i for i, s in enumerate(slots)}
    seen_f = [0] * len(slots)
    seen_b = [0] * len(slots)
    out: list[list[tuple[int, int]]] = []
    for rank, steps in enumerate(template.steps):
        row: list[tuple[int, int]] = []
        for step in steps:
            fwd = bwd = -1
            for action in step_actions(step):
                i = where[(rank, action.phase)]
                if action.op is Op.FORWARD:
                    fwd, count = i, seen_f
                elif action.op.is_backward:
                    bwd, count = i, seen_b
                else:
                    continue
                if action.chunk != count[i]:
                    raise ValueError(f"template rank {rank}: {action} is out of micro-batch order")
                count[i] += 1
            if split_pairs and fwd >= 0 and bwd >= 0:
                row.extend(((fwd, -1), (-1, bwd)))
            elif fwd >= 0 or bwd >= 0:
                row.append((fwd, bwd))
        out.append(row)
    if any(x != chunks for x in seen_f + seen_b):
        raise ValueError("template does not run every micro-batch once per stage")
    return out


def list_schedule(
    layout: Layout,
    chunks_per_stream: int,
    costs: Costs,
    limit: float,
    policy: Policy,
    template: Schedule | None = None,
) -> tuple[Schedule, float] | None:
    """Build a schedule by simulating the pipeline and letting each free rank pick its
    next step by ``policy``; return it with its makespan, or None if the policy stalls.

    With a ``template`` (a schedule on ``layout`` whose forwards and backwards run in
    micro-batch order per stage), each rank runs the template's forwards, backwards and
    pairs in the template's order (a pair as its two halves when pairing saves nothing,
    ``fb >= f + b``) and the policy only decides the weight gradients:
    backwards become input-only (``policy.split``) and each ``W`` fills a wait (by
    ``policy.w_gap``) or runs at the end. The memory profile is then the template's.

    Every rank holds at most ``limit`` memory (the simulator's ``peak_memory``: live
    activations plus ``costs.w_memory`` per deferred weight gradient). A
    forward that will visit its rank again later (the V's way down) leaves one slot
    free for that return, and with several streams (DualPipe) each stream has its own
    share of the limit, so the oldest micro-batch can always move on and no policy stalls
    (``limit >= 2`` on the V, ``limit >= streams`` otherwise). The makespan is
    the one :func:`dualpipe.simulation.simulate` reports for the returned schedule: a
    step is placed when its rank is free and its inputs have arrived, as there.
    """
    slots = _slots(layout)
    revisit = _revisits(layout)
    n = layout.num_ranks
    c = chunks_per_stream
    comm = costs.comm
    gain = costs.f + costs.b - costs.pair
    use_pairs = policy.pair and gain > 0
    rank_slots: list[list[int]] = [[] for _ in range(n)]
    for i, s in enumerate(slots):
        rank_slots[s.rank].append(i)
    f_end: list[list[float]] = [[_INF] * c for _ in slots]
    b_end: list[list[float]] = [[_INF] * c for _ in slots]
    next_f = [0] * len(slots)
    next_b = [0] * len(slots)
    live = [0] * n
    streams = layout.num_streams
    # several streams share each rank: each gets a fixed share of the limit, so the oldest
    # micro-batch of every stream always finds room and no policy can stall
    if limit == int(limit):
        whole = int(limit)
        quota: list[float] = [
            whole // streams + (1 if k < whole % streams else 0) for k in range(streams)
        ]
    else:
        quota = [limit / streams] * streams
    live_in = [[0] * streams for _ in range(n)]
    # deferred weight-gradient state held per rank (and per stream), in activations
    held = [0.0] * n
    held_in = [[0.0] * streams for _ in range(n)]
    stage_w = [w_state(costs.w_memory, layout.stage(s.rank, s.phase)) for s in slots]
    slot_of = {(s.rank, s.phase): i for i, s in enumerate(slots)}
    free_at = [0.0] * n
    deferred: list[deque[tuple[int, int]]] = [deque() for _ in range(n)]
    rows: list[list[Step]] = [[] for _ in range(n)]
    left = [2 * c * len(rank_slots[r]) for r in range(n)]  # F and B/I still to run
    # headroom never starves a rank: the first visit always fits into an empty rank
    least = 2 if revisit else 1
    entry_cap = max(limit - policy.headroom, least)
    w_gap = policy.w_gap * costs.w
    pair_wait = policy.pair_wait * gain
    is_revisit = [(s.stream, s.pos) in revisit for s in slots]
    # a pair that saves nothing only waits for two inputs: run its halves one by one
    # (never later in the simulator: the forward's result even leaves earlier)
    order = None if template is None else _template_moves(template, slots, c, gain <= 0)
    t_cursor = [0] * n

    def f_arrival(i: int, r: int) -> float:
        mb = next_f[i]
        if mb >= c:
            return _INF
        prev = slots[i].prev
        if prev < 0:
            return 0.0
        end = f_end[prev][mb]
        return end + comm if slots[prev].rank != r else end

    def b_arrival(i: int, r: int) -> float:
        mb = next_b[i]
        if mb >= next_f[i]:
            return _INF
        nxt = slots[i].next
        if nxt < 0:
            return f_end[i][mb]
        end = b_end[nxt][mb]
        return end + comm if slots[nxt].rank != r else end

    def f_fits(i: int, r: int, paired: bool) -> bool:
        """Memory check for running the next forward of slot ``i`` (alone or in a pair)."""
        slot = slots[i]
        if streams > 1:  # the stream's own share, less the headroom on a first visit
            used = live_in[r][slot.stream] + held_in[r][slot.stream]
            room = quota[slot.stream] - (policy.headroom if slot.first_visit else 0)
            room = max(room, least)
        else:
            used = live[r] + held[r]
            room = min(limit, entry_cap) if slot.first_visit else limit
        if is_revisit[i] and not paired:
            room -= 1  # keep one slot for the micro-batch's return to this rank
        return used + 1 <= room + 1e-9

    def moves(r: int) -> tuple[float, list[tuple[float, int, int]]]:
        """Rank r's candidate steps as ``(ready time, forward slot, backward slot)`` (-1:
        none; both -1: a W), and the earliest ready time among them."""
        t0 = free_at[r]
        if order is not None:
            return _template_move(r, t0)
        fs = [(i, f_arrival(i, r)) for i in rank_slots[r]]
        bs = [(i, b_arrival(i, r)) for i in rank_slots[r] if next_b[i] < next_f[i]]
        bs = [(i, a) for i, a in bs if a < _INF]
        out: list[tuple[float, int, int]] = []
        first_pair = _INF
        if use_pairs:
            for i, a in fs:
                if a < _INF and f_fits(i, r, True):
                    for j, ab in bs:
                        ready = max(t0, a, ab)
                        out.append((ready, i, j))
                        first_pair = min(first_pair, ready)
        for i, a in fs:
            if a < _INF and f_fits(i, r, False):
                ready = max(t0, a)
                if first_pair - ready > pair_wait:
                    out.append((ready, i, -1))
        for j, ab in bs:
            ready = max(t0, ab)
            if first_pair - ready > pair_wait:
                out.append((ready, -1, j))
        best = min((m[0] for m in out), default=_INF)
        if deferred[r] and best > t0 and (best == _INF or best - t0 >= w_gap):
            out.append((t0, -1, -1))
            best = t0
        return best, out

    def _template_move(r: int, t0: float) -> tuple[float, list[tuple[float, int, int]]]:
        assert order is not None
        out: list[tuple[float, int, int]] = []
        best = _INF
        if t_cursor[r] < len(order[r]):
            i, j = order[r][t_cursor[r]]
            if i >= 0 and deferred[r] and live[r] + held[r] + 1 > limit + 1e-9:
                # the forward fits the limit only once deferred state is freed: a W first
                return t0, [(t0, -1, -1)]
            best = max(t0, f_arrival(i, r) if i >= 0 else 0.0, b_arrival(j, r) if j >= 0 else 0.0)
            out.append((best, i, j))
        if deferred[r] and best > t0 and (best == _INF or best - t0 >= w_gap):
            out.append((t0, -1, -1))
            best = t0
        return best, out

    def rank_key(i: int, deep: bool) -> int:
        return -slots[i].pos if deep else slots[i].pos

    def choose(cands: list[tuple[float, int, int]]) -> tuple[int, int]:
        """The move a policy runs among those ready now."""

        def key(m: tuple[float, int, int]) -> tuple[int, int, int]:
            _, i, j = m
            if i >= 0 and j >= 0:
                kind = 0
            elif j >= 0:
                kind = 1 if policy.backward_first else 2
            elif i >= 0:
                kind = 2 if policy.backward_first else 1
            else:
                kind = 3
            fk = rank_key(i, policy.deep_forward) if i >= 0 else 0
            bk = rank_key(j, policy.deep_backward) if j >= 0 else 0
            return (kind, bk, fk) if policy.backward_first else (kind, fk, bk)

        _, i, j = min(cands, key=key)
        return i, j

    def backward_action(i: int, r: int) -> Action:
        s = slots[i]
        mb = next_b[i]
        split = policy.split and (
            policy.max_deferred is None or len(deferred[r]) < policy.max_deferred
        )
        if split:
            deferred[r].append((s.phase, mb))
            held[r] += stage_w[i]
            held_in[r][s.stream] += stage_w[i]
            return Action(Op.INPUT, s.phase, mb)
        return Action(Op.BACKWARD, s.phase, mb)

    cache: list[tuple[float, list[tuple[float, int, int]]] | None] = [None] * n
    while True:
        best_r, best_t = -1, _INF
        for r in range(n):
            if not left[r] and not deferred[r]:
                continue
            entry = cache[r]
            if entry is None:
                entry = cache[r] = moves(r)
            if entry[0] < best_t:
                best_r, best_t = r, entry[0]
        if best_r < 0:
            if any(left[r] or deferred[r] for r in range(n)):
                return None  # the policy stalled (memory held by work that cannot finish)
            break
        r, t = best_r, best_t
        entry = cache[r]
        assert entry is not None
        fwd, bwd = choose([m for m in entry[1] if m[0] <= t])
        touched = {r}
        if fwd < 0 and bwd < 0:
            phase, mb = deferred[r].popleft()
            k = slot_of[(r, phase)]
            held[r] -= stage_w[k]
            held_in[r][slots[k].stream] -= stage_w[k]
            weight = Action(Op.WEIGHT, phase, mb)
            end = t + step_duration(weight, costs)
            rows[r].append(weight)
        else:
            f_act = b_act = None
            if fwd >= 0:
                f_act = Action(Op.FORWARD, slots[fwd].phase, next_f[fwd])
            if bwd >= 0:
                b_act = backward_action(bwd, r)
            if f_act is not None and b_act is not None:
                step: Step = Overlap(f_act, b_act)
            elif f_act is not None:
                step = f_act
            else:
                assert b_act is not None
                step = b_act
            end = t + step_duration(step, costs)
            rows[r].append(step)
            t_cursor[r] += 1
            if fwd >= 0:
                f_end[fwd][next_f[fwd]] = end
                next_f[fwd] += 1
                live[r] += 1
                live_in[r][slots[fwd].stream] += 1
                left[r] -= 1
                nxt = slots[fwd].next
                if nxt >= 0:
                    touched.add(slots[nxt].rank)
            if bwd >= 0:
                b_end[bwd][next_b[bwd]] = end
                next_b[bwd] += 1
                live[r] -= 1
                live_in[r][slots[bwd].stream] -= 1
                left[r] -= 1
                prev = slots[bwd].prev
                if prev >= 0:
                    touched.add(slots[prev].rank)
        free_at[r] = end
        for q in touched:
            cache[q] = None

    makespan = max(free_at, default=0.0)
    schedule = Schedule("auto", layout, c, tuple(tuple(row) for row in rows))
    return schedule, makespan
