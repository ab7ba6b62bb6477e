"""Prove a schedule sound before anything runs it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..errors import ScheduleError
from .actions import Action, Op, Overlap, Step, step_actions
from .dependency import dependency, needs_result
from .schedule import Schedule

__all__ = ["problems", "validate"]

_SHOWN = 8
"""How many problems :func:`validate` quotes in its error message."""

_Key = tuple[int, int, int]
"""``(stream, position, micro-batch)``: one stage of one micro-batch."""


@dataclass(frozen=True, slots=True)
class _Site:
    """Where an action sits: its rank, step index, index among the rank's
    actions (pairs flattened forward first) and the step itself."""

    rank: int
    step: int
    flat: int
    item: Step

    @property
    def token(self) -> str:
        return str(self.item)

    def at(self) -> str:
        return f"rank {self.rank} step {self.step} ({self.token})"


def _describe(schedule: Schedule, key: _Key) -> str:
    stream, pos, chunk = key
    rank, phase = schedule.layout.paths[stream][pos]
    return f"stream {stream} position {pos} micro-batch {chunk} (rank {rank} phase {phase})"


def _part(step: Step, action: Action) -> str:
    """``", part B0.1"`` when ``action`` is half of a pair, else nothing."""
    return f", part {action}" if isinstance(step, Overlap) else ""


def problems(schedule: Schedule) -> list[str]:
    """Every problem of ``schedule``, one precise line each; empty when sound.

    See the module docstring for the checks (a) to (e).
    """
    layout = schedule.layout
    num_chunks = schedule.chunks_per_stream
    found: list[str] = []

    # (a) well-formed actions; index the valid ones by (stream, position, chunk).
    forwards: dict[_Key, list[_Site]] = defaultdict(list)
    backwards: dict[_Key, list[_Site]] = defaultdict(list)
    rank_actions: list[list[tuple[_Site, Action, _Key | None]]] = []
    if num_chunks < 1:
        found.append(f"chunks_per_stream must be >= 1, got {num_chunks}")
    for rank, steps in enumerate(schedule.steps):
        row: list[tuple[_Site, Action, _Key | None]] = []
        flat = 0
        for index, step in enumerate(steps):
            for action in step_actions(step):
                site = _Site(rank, index, flat, step)
                flat += 1
                key: _Key | None = None
                if not layout.has(rank, action.phase):
                    found.append(
                        f"{site.at()}{_part(step, action)}: rank {rank} has no phase "
                        f"{action.phase} in this layout"
                    )
                elif action.chunk >= num_chunks:
                    found.append(
                        f"{site.at()}{_part(step, action)}: micro-batch {action.chunk} out of "
                        f"range (chunks_per_stream = {num_chunks})"
                    )
                else:
                    stream, pos = layout.locate(rank, action.phase)
                    key = (stream, pos, action.chunk)
                    if action.op is Op.FORWARD:
                        forwards[key].append(site)
                    elif action.op.is_backward:
                        backwards[key].append(site)
                row.append((site, action, key))
        rank_actions.append(row)

    # (b) each forward and backward exactly once, forward first.
    for stream, path in enumerate(layout.paths):
        for pos, (rank, phase) in enumerate(path):
            for chunk in range(num_chunks):
                key = (stream, pos, chunk)
                fwd, bwd = forwards.get(key, []), backwards.get(key, [])
                where = _describe(schedule, key)
                if not fwd:
                    found.append(f"rank {rank}: F{phase}.{chunk} never runs ({where})")
                for extra in fwd[1:]:
                    found.append(
                        f"{extra.at()}: F{phase}.{chunk} runs again (first at step {fwd[0].step})"
                    )
                if not bwd:
                    found.append(
                        f"rank {rank}: no backward (B{phase}.{chunk} or I{phase}.{chunk}) "
                        f"ever runs ({where})"
                    )
                for extra in bwd[1:]:
                    found.append(
                        f"{extra.at()}: backward of {phase}.{chunk} runs again "
                        f"(first at step {bwd[0].step})"
                    )
                if fwd and bwd and bwd[0].flat < fwd[0].flat:
                    found.append(
                        f"{bwd[0].at()}: backward of {phase}.{chunk} runs before its forward "
                        f"(step {fwd[0].step})"
                    )

    # (c) every I matched by exactly one later W on the same rank.
    for row in rank_actions:
        pending: dict[tuple[int, int], _Site] = {}
        weighted: dict[tuple[int, int], _Site] = {}
        kinds: dict[tuple[int, int], list[tuple[Op, _Site]]] = defaultdict(list)
        for site, action, key in row:
            if key is not None and action.op.is_backward:
                kinds[(action.phase, action.chunk)].append((action.op, site))
        for site, action, key in row:
            if key is None:
                continue
            ident = (action.phase, action.chunk)
            name = f"{action.phase}.{action.chunk}"
            if action.op is Op.INPUT:
                pending[ident] = site
            elif action.op is Op.WEIGHT:
                if ident in pending:
                    weighted[ident] = site
                    del pending[ident]
                elif ident in weighted:
                    found.append(
                        f"{site.at()}: second W for I{name} "
                        f"(already run at step {weighted[ident].step})"
                    )
                else:
                    earlier = [(op, s) for op, s in kinds[ident] if s.flat < site.flat]
                    later = [(op, s) for op, s in kinds[ident] if s.flat > site.flat]
                    if any(op is Op.BACKWARD for op, _ in earlier):
                        found.append(
                            f"{site.at()}: W for B{name}, a full backward that defers nothing"
                        )
                    elif any(op is Op.INPUT for op, _ in later):
                        at = next(s.step for op, s in later if op is Op.INPUT)
                        found.append(f"{site.at()}: W{name} runs before its I{name} (step {at})")
                    else:
                        found.append(f"{site.at()}: W{name} without an earlier I{name}")
        for (phase, chunk), site in pending.items():
            found.append(
                f"{site.at()}: weight gradient of I{phase}.{chunk} is never run (no later W)"
            )

    # (e) a pair of one micro-batch at one position, or of two actions one of which
    #     needs the other's result (both halves start together).
    layout = schedule.layout
    for rank, steps in enumerate(schedule.steps):
        for index, step in enumerate(steps):
            if not isinstance(step, Overlap):
                continue
            a, b = step.first, step.second
            if a.op is Op.FORWARD and b.op.is_backward and (a.phase, a.chunk) == (
                    b.phase, b.chunk):
                found.append(
                    f"rank {rank} step {index} ({step}): a pair of the forward and backward of "
                    "the same micro-batch at the same position cannot overlap"
                )
            elif needs_result(layout, rank, b, a) or needs_result(layout, rank, a, b):
                found.append(
                    f"rank {rank} step {index} ({step}): one half needs the other's result, "
                    "so the two cannot overlap (write them as two steps)"
                )

    # (d) replay with non-blocking sends: who waits for what.
    found.extend(_deadlocks(schedule, rank_actions, forwards, backwards))
    return found


def _deadlocks(
    schedule: Schedule,
    rank_actions: list[list[tuple[_Site, Action, _Key | None]]],
    forwards: dict[_Key, list[_Site]],
    backwards: dict[_Key, list[_Site]],
) -> list[str]:
    """Replay every rank in order; report the ranks that can never finish.

    A step waits for the result of each of its actions' dependencies (the first
    run of the producing action); results made earlier in the same step (a
    pair's forward) count as available. Own-forward dependencies of backwards
    are same-rank program order, already checked by (b).
    """
    num_ranks = schedule.num_ranks
    by_step: list[list[list[tuple[_Site, Action, _Key | None]]]] = []
    for rank, row in enumerate(rank_actions):
        grouped: list[list[tuple[_Site, Action, _Key | None]]] = [[] for _ in schedule.steps[rank]]
        for entry in row:
            grouped[entry[0].step].append(entry)
        by_step.append(grouped)

    done: set[tuple[int, int]] = set()  # (rank, flat) of actions that ran
    cursor = [0] * num_ranks

    def producer(rank: int, action: Action, key: _Key) -> tuple[_Key, _Site | None] | None:
        dep = dependency(schedule.layout, rank, action)
        # a W's I and the last stage's own forward are this rank's order: checks (b), (c)
        if dep is None or dep.op is Op.INPUT or dep.index == key[1]:
            return None
        table = forwards if dep.op is Op.FORWARD else backwards
        sites = table.get(dep.key)
        return dep.key, (sites[0] if sites else None)

    def blocker(rank: int) -> tuple[Action, _Key, _Site | None] | None:
        """The first unmet dependency of ``rank``'s current step, if any."""
        entries = by_step[rank][cursor[rank]]
        for site, action, key in entries:
            if key is None:
                continue
            dep = producer(rank, action, key)
            if dep is None:
                continue
            need, src = dep
            if src is None:
                return action, need, None
            if (src.rank, src.flat) in done:
                continue
            if src.rank == rank and src.step == site.step and src.flat < site.flat:
                continue
            return action, need, src
        return None

    # Event-driven replay: a blocked rank sleeps until the action it waits for runs.
    sleepers: dict[tuple[int, int], list[int]] = defaultdict(list)
    ready = list(range(num_ranks))
    while ready:
        rank = ready.pop()
        while cursor[rank] < len(by_step[rank]):
            info = blocker(rank)
            if info is not None:
                src = info[2]
                if src is not None and src.rank != rank:
                    sleepers[(src.rank, src.flat)].append(rank)
                break
            for site, _, _ in by_step[rank][cursor[rank]]:
                done.add((rank, site.flat))
                ready.extend(sleepers.pop((rank, site.flat), ()))
            cursor[rank] += 1

    stuck = [r for r in range(num_ranks) if cursor[r] < len(by_step[r])]
    if not stuck:
        return []
    messages: list[str] = []
    waits_on: dict[int, int] = {}
    for rank in stuck:
        index = cursor[rank]
        token = str(schedule.steps[rank][index])
        info = blocker(rank)
        assert info is not None
        action, need, src = info
        kind = "forward" if action.op is Op.FORWARD else "backward"
        what = f"the {kind} of {_describe(schedule, need)}"
        head = f"rank {rank} step {index} ({token}): deadlock, {action} waits for {what}"
        if src is None:
            messages.append(f"{head}, which never runs")
        elif src.rank == rank:
            messages.append(f"{head}, run later on this rank at step {src.step} ({src.token})")
        else:
            other = cursor[src.rank]
            other_token = (
                str(schedule.steps[src.rank][other])
                if other < len(by_step[src.rank])
                else "end of list"
            )
            messages.append(
                f"{head}, run by rank {src.rank} at step {src.step} ({src.token}), "
                f"which is itself blocked at step {other} ({other_token})"
            )
            waits_on[rank] = src.rank
    cycle = _cycle(waits_on)
    if cycle:
        hops = " -> ".join(f"rank {r} step {cursor[r]}" for r in cycle)
        messages.append(f"deadlock cycle: {hops} -> rank {cycle[0]} step {cursor[cycle[0]]}")
    return messages


def _cycle(waits_on: dict[int, int]) -> list[int]:
    """One cycle of the rank wait-for graph (each rank waits for at most one), if any."""
    for start in sorted(waits_on):
        seen: list[int] = []
        rank: int | None = start
        while rank is not None and rank not in seen:
            seen.append(rank)
            rank = waits_on.get(rank)
        if rank is not None:
            return seen[seen.index(rank) :]
    return []


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` listing the problems of ``schedule``, if any.

    The message quotes the first few problems and says how many there are in all.
    """
    found = problems(schedule)
    if not found:
        return
    shown = "\n  ".join(found[:_SHOWN])
    more = f"\n  ... and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    raise ScheduleError(
        f"schedule {schedule.name!r} is unsound ({len(found)} problem"
        f"{'s' if len(found) != 1 else ''}):\n  {shown}{more}"
    )
