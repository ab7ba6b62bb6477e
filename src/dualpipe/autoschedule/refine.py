"""Local search on a schedule's per-rank lists, with the simulated makespan as the objective.

Moves change the order on one rank: a step on the critical path goes one place earlier, a
pair on it is split, two neighbouring steps on it become a pair. A move is kept when the
makespan (then the sum of the ranks' finishing times) drops and every rank stays within
the activation limit; an order that cannot finish is rejected by the evaluation itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedules.actions import Action, Op, Overlap, Step, step_actions
from ..schedules.dependency import dependency
from ..schedules.schedule import Schedule
from ..simulation import Costs, step_duration, w_state

__all__ = ["Compiled", "compile_schedule", "refine"]

_INF = float("inf")
_F, _B, _I = 0, 1, 2  # result tables: forward output, input gradient, deferred weight work
_DEFERS = {Op.INPUT: 1, Op.WEIGHT: -1}


@dataclass(frozen=True, slots=True)
class _Item:
    """A step ready for fast evaluation: its duration, the results it waits for (id,
    delay), the results it makes, and its effect on live activations."""

    step: Step
    dur: float
    needs: tuple[tuple[int, float], ...]
    makes: tuple[int, ...]
    forwards: int  # forwards it starts (two in an F+F pair)
    backwards: int  # micro-batches it releases (B or I; two in a B+B pair)
    defers: int  # +1 for an input-only backward, -1 for a W
    held: float = 0.0  # deferred weight-gradient state it adds (I) or frees (W, negative)


@dataclass
class Compiled:
    """A schedule in a form that simulates fast and is cheap to reorder."""

    schedule: Schedule
    rows: list[list[_Item]]
    num_results: int

    def to_schedule(self) -> Schedule:
        """The current order as a :class:`Schedule`."""
        s = self.schedule
        steps = tuple(tuple(item.step for item in row) for row in self.rows)
        return Schedule(s.name, s.layout, s.chunks_per_stream, steps)


def compile_schedule(schedule: Schedule, costs: Costs) -> Compiled:
    """Prepare ``schedule`` for :func:`evaluate` (same semantics as ``simulate``)."""
    layout = schedule.layout
    c = schedule.chunks_per_stream
    index: dict[tuple[int, int], int] = {}
    for stream, path in enumerate(layout.paths):
        for pos in range(len(path)):
            index[(stream, pos)] = len(index)
    slots = len(index)

    def rid(table: int, stream: int, pos: int, chunk: int) -> int:
        return (table * slots + index[(stream, pos)]) * c + chunk

    tables = {Op.FORWARD: _F, Op.BACKWARD: _B, Op.INPUT: _I}

    def item(rank: int, step: Step) -> _Item:
        needs: list[tuple[int, float]] = []
        makes: list[int] = []
        for action in step_actions(step):
            dep = dependency(layout, rank, action)
            if dep is not None:
                delay = costs.comm if dep.rank != rank else 0.0
                needs.append((rid(tables[dep.op], dep.stream, dep.index, dep.chunk), delay))
            stream, pos = layout.locate(rank, action.phase)
            if action.op is Op.FORWARD:
                makes.append(rid(_F, stream, pos, action.chunk))
            elif action.op.is_backward:
                makes.append(rid(_B, stream, pos, action.chunk))
                if action.op is Op.INPUT:
                    makes.append(rid(_I, stream, pos, action.chunk))
        own = set(makes)  # a result made inside this step (a pair's forward) is not waited for
        return _Item(
            step=step,
            dur=step_duration(step, costs),
            needs=tuple(x for x in needs if x[0] not in own),
            makes=tuple(makes),
            forwards=sum(a.op is Op.FORWARD for a in step_actions(step)),
            backwards=sum(a.op.is_backward for a in step_actions(step)),
            defers=sum(_DEFERS.get(a.op, 0) for a in step_actions(step)),
            held=sum(
                _DEFERS.get(a.op, 0) * w_state(costs.w_memory, layout.stage(rank, a.phase))
                for a in step_actions(step)
            ),
        )

    rows = [[item(r, step) for step in schedule.steps[r]] for r in range(schedule.num_ranks)]
    return Compiled(schedule, rows, 3 * slots * c)


@dataclass
class _Eval:
    """Outcome of one evaluation: per-rank starts, who made each result, the makespan."""

    makespan: float
    finish: float
    starts: list[list[float]]
    maker: list[tuple[int, int]]
    ends: list[float]


def evaluate(compiled: Compiled, detail: bool = False) -> _Eval | None:
    """Simulate the current order; None if some rank can never finish."""
    rows = compiled.rows
    n = len(rows)
    ends = [_INF] * compiled.num_results
    maker: list[tuple[int, int]] = [(-1, -1)] * (compiled.num_results if detail else 0)
    starts: list[list[float]] = [[0.0] * len(row) for row in rows] if detail else []
    cursor = [0] * n
    free = [0.0] * n
    remaining = sum(len(row) for row in rows)
    while remaining:
        progressed = False
        for r in range(n):
            row = rows[r]
            k = cursor[r]
            t = free[r]
            while k < len(row):
                it = row[k]
                s = t
                blocked = False
                for rid, delay in it.needs:
                    e = ends[rid]
                    if e == _INF:
                        blocked = True
                        break
                    if e + delay > s:
                        s = e + delay
                if blocked:
                    break
                t = s + it.dur
                for rid in it.makes:
                    ends[rid] = t
                if detail:
                    starts[r][k] = s
                    for rid in it.makes:
                        maker[rid] = (r, k)
                k += 1
            if k != cursor[r]:
                progressed = True
                remaining -= k - cursor[r]
                cursor[r] = k
                free[r] = t
        if not progressed:
            return None
    return _Eval(max(free, default=0.0), sum(free), starts, maker, ends)


def peak(row: list[_Item]) -> int:
    """Most live activations on one rank (a pair's forward counts before its backward)."""
    live = top = 0
    for it in row:
        if it.forwards:
            live += it.forwards
            top = max(top, live)
        live -= it.backwards
    return top


def memory_peak(row: list[_Item]) -> float:
    """Most memory on one rank: live activations plus deferred weight-gradient state
    (as :func:`dualpipe.simulation.peak_memory`)."""
    live = top = 0.0
    for it in row:
        if it.forwards:
            live += it.forwards
            top = max(top, live)
        live -= it.backwards
        live += it.held
        top = max(top, live)
    return top


def deferred_peak(row: list[_Item]) -> int:
    """Most weight gradients deferred at once on one rank."""
    pending = top = 0
    for it in row:
        pending += it.defers
        top = max(top, pending)
    return top


def _critical(compiled: Compiled, ev: _Eval) -> list[tuple[int, int]]:
    """Steps on one critical path, from the last to finish back to the start."""
    rows = compiled.rows
    best_r = max(
        range(len(rows)), key=lambda r: ev.starts[r][-1] + rows[r][-1].dur if rows[r] else -1.0
    )
    r, k = best_r, len(rows[best_r]) - 1
    path: list[tuple[int, int]] = []
    while k >= 0:
        path.append((r, k))
        s = ev.starts[r][k]
        prev_end = ev.starts[r][k - 1] + rows[r][k - 1].dur if k > 0 else 0.0
        nxt: tuple[int, int] | None = None
        if k > 0 and prev_end >= s - 1e-12:
            nxt = (r, k - 1)
        else:
            for rid, delay in rows[r][k].needs:
                if ev.ends[rid] + delay >= s - 1e-12:
                    nxt = ev.maker[rid]
                    break
        if nxt is None:
            break
        r, k = nxt
    return path


def _pair_parts(item: _Item) -> tuple[Action, Action] | None:
    step = item.step
    return (step.first, step.second) if isinstance(step, Overlap) else None


def refine(
    schedule: Schedule,
    costs: Costs,
    limit: float,
    max_evals: int,
    allow_pairs: bool = True,
    max_deferred: int | None = None,
) -> tuple[Schedule, float]:
    """Improve ``schedule`` by local search with at most ``max_evals`` simulations; return
    the best order found and its simulated makespan. Every rank keeps at most ``limit``
    memory (activations and deferred weight-gradient state, :func:`memory_peak`) and
    ``max_deferred`` deferred weight gradients (None: no bound).
    ``allow_pairs``: moves may form overlapped pairs (worth it only when ``fb < f + b``)."""
    compiled = compile_schedule(schedule, costs)
    rows = compiled.rows
    initial = evaluate(compiled, detail=True)
    if initial is None:
        raise ValueError("refine needs a schedule that can finish")
    current: _Eval = initial
    evals = 0
    recompile_cache: dict[tuple[int, Step], _Item] = {}

    def item_for(rank: int, step: Step) -> _Item:
        key = (rank, step)
        got = recompile_cache.get(key)
        if got is None:
            one = Schedule(
                schedule.name,
                schedule.layout,
                schedule.chunks_per_stream,
                tuple((step,) if q == rank else () for q in range(len(rows))),
            )
            got = recompile_cache[key] = compile_schedule(one, costs).rows[rank][0]
        return got

    def candidates(r: int, k: int) -> list[tuple[int, int, list[_Item]]]:
        """Rewrites of rank r around its step k: (first index, steps replaced, new steps)."""
        row = rows[r]
        out: list[tuple[int, int, list[_Item]]] = []
        if k > 0:
            out.append((k - 1, 2, [row[k], row[k - 1]]))
        parts = _pair_parts(row[k])
        if parts is not None:
            f, b = parts
            out.append((k, 1, [item_for(r, b), item_for(r, f)]))
            out.append((k, 1, [item_for(r, f), item_for(r, b)]))
        if allow_pairs and k > 0:
            a, b2 = row[k - 1].step, row[k].step
            for first, second in ((a, b2), (b2, a)):
                if (
                    isinstance(first, Action)
                    and isinstance(second, Action)
                    and first.op is Op.FORWARD
                    and second.op.is_backward
                    and (first.phase, first.chunk) != (second.phase, second.chunk)
                ):
                    out.append((k - 1, 2, [item_for(r, Overlap(first, second))]))
        return out

    def better(ev: _Eval | None) -> bool:
        if ev is None:
            return False
        if ev.makespan < current.makespan - 1e-9:
            return True
        return ev.makespan <= current.makespan + 1e-9 and ev.finish < current.finish - 1e-9

    improved = True
    while improved and evals < max_evals:
        improved = False
        for r, k in _critical(compiled, current):
            if evals >= max_evals:
                break
            row = rows[r]
            for first, width, new in candidates(r, k):
                old = row[first : first + width]
                row[first : first + width] = new
                if memory_peak(row) <= limit + 1e-9 and (
                    max_deferred is None or deferred_peak(row) <= max_deferred
                ):
                    evals += 1
                    ev = evaluate(compiled, detail=True)
                    if better(ev):
                        assert ev is not None
                        current = ev
                        improved = True
                        break
                row[first : first + len(new)] = old
            if improved:
                break
    return compiled.to_schedule(), current.makespan
