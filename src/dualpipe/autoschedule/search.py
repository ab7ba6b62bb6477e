"""The search: seeds, a family of list-scheduling policies, then local search on the best.

See ``docs/autoschedule.md`` for why these candidates and why it stays fast.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from ..errors import ScheduleError
from ..pairing import pair_steps
from ..schedules import Op, generate, schedule_names, validate
from ..schedules.layout import Layout, dualpipe_layout, dualpipev_layout
from ..schedules.schedule import Schedule
from ..simulation import Costs, peak_memory, simulate
from .listing import Policy, list_schedule
from .refine import refine

__all__ = [
    "AutoSchedule",
    "LAYOUTS",
    "activation_limit",
    "autoschedule",
    "deferred_peak",
    "search",
]

LAYOUTS = {"v": dualpipev_layout, "dualpipe": dualpipe_layout}
"""Layouts the search places stages on: ``v`` (DualPipeV's and ZBV's: rank r holds stages
r and 2N-1-r) and ``dualpipe`` (DualPipe's two directions, stages r and N-1-r)."""

SEEDS = {"v": ("dualpipev", "zbv", "v-half", "v-min"), "dualpipe": ("dualpipe",)}
"""Named schedules on each layout that seed the search (those registered, where they exist
for the sizes)."""

ONE_F_ONE_B = Policy(split=False, pair=False)
"""1F1B on the layout: a ready backward first, full backwards, no pairs."""


def deferred_peak(schedule: Schedule) -> int:
    """Most weight gradients any rank keeps deferred at once (input-only backwards whose
    ``W`` has not run yet): each holds what its weight gradient needs (e.g. the inputs
    of the stage's linear layers), memory the activation metric does not count."""
    top = 0
    for rank in range(schedule.num_ranks):
        pending = 0
        for action in schedule.actions(rank):
            pending += {Op.INPUT: 1, Op.WEIGHT: -1}.get(action.op, 0)
            top = max(top, pending)
    return top


def activation_limit(layout: Layout) -> int:
    """The default per-rank limit: ``PP + 1`` stage activations, ``PP`` the number of model
    stages (DualPipeV's and DualPipe's peak in the simulator's metric: micro-batches whose
    forward has started and whose backward has not finished, per stage held; with the
    default ``w_memory`` their deferred weight-gradient state adds nothing to it)."""
    return layout.num_stages + 1


@dataclass(frozen=True)
class AutoSchedule:
    """The outcome of :func:`search`.

    Attributes:
        schedule: the best schedule found (validated), named ``auto``.
        makespan: its simulated step time.
        peak: its largest per-rank peak of activations.
        limit: the per-rank memory limit searched under, in stage activations.
        deferred: its :func:`deferred_peak` (``<= max_deferred`` when that was given).
        origin: which candidate it came from (a seed, a seed with its weight gradients
            re-placed, or a policy), and ``+ local search`` when that improved it.
        seeds: simulated makespan of every seed under the same costs, ``None`` where the
            seed does not exist for these sizes or exceeds the limit.
        candidates: how many schedules were built and simulated.
        seconds: wall time of the search.
        memory: its largest per-rank peak memory (``<= limit``): activations plus the
            state of deferred weight gradients, ``w_memory`` each
            (:func:`dualpipe.simulation.peak_memory`).
        w_memory: the state per deferred weight gradient searched with (``costs.w_memory``).
    """

    schedule: Schedule
    makespan: float
    peak: int
    limit: float
    deferred: int
    origin: str
    seeds: dict[str, float | None] = field(default_factory=dict)
    candidates: int = 0
    seconds: float = 0.0
    memory: float = 0.0
    w_memory: float | tuple[float, ...] = 0.0


def _memory(schedule: Schedule, costs: Costs) -> float:
    """The schedule's largest per-rank peak memory under ``costs.w_memory``."""
    return max(peak_memory(schedule, r, costs.w_memory) for r in range(schedule.num_ranks))


def _policies(costs: Costs, max_deferred: int | None) -> list[Policy]:
    """The policy family (a fixed list, so the search is deterministic)."""
    gain = costs.f + costs.b - costs.pair > 0
    waits = (0.0, 0.5, 1.0) if gain else (0.0,)
    out = []
    for pair_wait, backward_first, deep_backward, w_gap, headroom in itertools.product(
        waits, (True, False), (True, False), (0.0, 0.5), (0, 1, 2)
    ):
        out.append(
            Policy(
                pair=gain,
                pair_wait=pair_wait,
                backward_first=backward_first,
                deep_backward=deep_backward,
                w_gap=w_gap,
                headroom=headroom,
                max_deferred=max_deferred,
            )
        )
    return out


def _named(name: str, num_ranks: int, num_chunks: int) -> Schedule | None:
    try:
        return generate(name, num_ranks, num_chunks)
    except ScheduleError:
        return None


def search(
    num_ranks: int,
    num_chunks: int,
    costs: Costs,
    *,
    limit: float | None = None,
    layout: str = "v",
    max_deferred: int | None = None,
    refine_evals: int = 300,
    pairs: bool | None = None,
) -> AutoSchedule:
    """Find the schedule with the shortest simulated step on ``layout`` under ``costs``
    with at most ``limit`` memory per rank (default :func:`activation_limit`) and,
    if given, at most ``max_deferred`` deferred weight gradients per rank. Memory counts
    stage activations and the state of deferred weight gradients, ``costs.w_memory`` of
    an activation each (:func:`dualpipe.simulation.peak_memory`).

    ``num_chunks`` counts all micro-batches (even for the ``dualpipe`` layout, half per
    direction). ``refine_evals`` bounds the local search (simulations per candidate
    refined). The result is never slower than a seed that fits the limit. ``pairs``:
    also pair two forwards or two backwards of a rank where that is faster
    (:func:`dualpipe.pairing.pair_steps`); default: when ``costs`` has per-part costs.

    Raises:
        ValueError: bad sizes, an unknown layout, or a limit no schedule fits.
    """
    t0 = time.perf_counter()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if num_ranks < 1 or num_chunks < 1:
        raise ValueError(f"need ranks >= 1 and chunks >= 1, got {num_ranks}, {num_chunks}")
    place = LAYOUTS[layout](num_ranks)
    if num_chunks % place.num_streams:
        raise ValueError(
            f"the {layout} layout needs a multiple of {place.num_streams} micro-batches,"
            f" got {num_chunks}"
        )
    per_stream = num_chunks // place.num_streams
    cap = activation_limit(place) if limit is None else limit
    revisits = any(len({r for r, _ in p}) < len(p) for p in place.paths)
    floor = 2 if revisits else place.num_streams
    if cap < floor:
        raise ValueError(f"the {layout} layout needs a memory limit >= {floor}, got {cap:g}")

    found: list[tuple[float, str, Schedule]] = []
    seeds: dict[str, float | None] = {}
    built = 0

    def keep(schedule: Schedule, makespan: float, origin: str) -> None:
        if _memory(schedule, costs) <= cap + 1e-9:
            found.append((makespan, origin, schedule))

    for name in (x for x in SEEDS[layout] if x in schedule_names()):
        seed = _named(name, num_ranks, num_chunks)
        if (
            seed is None
            or _memory(seed, costs) > cap + 1e-9
            or (max_deferred is not None and deferred_peak(seed) > max_deferred)
        ):
            seeds[name] = None
            continue
        makespan = simulate(seed, costs).makespan
        seeds[name] = makespan
        keep(seed, makespan, name)
        built += 1
        for w_gap in (0.0, 0.5, 1.0, 2.0):
            res = list_schedule(
                place, per_stream, costs, cap, Policy(w_gap=w_gap, max_deferred=max_deferred), seed
            )
            built += 1
            if res is not None:
                keep(res[0], res[1], f"{name}, weight gradients re-placed (w_gap {w_gap:g})")
    for policy in [ONE_F_ONE_B, *_policies(costs, max_deferred)]:
        res = list_schedule(place, per_stream, costs, cap, policy)
        built += 1
        if res is not None:
            keep(res[0], res[1], "1F1B on the layout" if policy is ONE_F_ONE_B else str(policy))
    if not found:
        raise ValueError(f"no schedule fits a memory limit of {cap:g} per rank")

    found.sort(key=lambda x: x[0])
    best_makespan, best_origin, best = found[0]
    tried: set[str] = set()
    for _, origin, schedule in found:
        if len(tried) == 2:
            break
        text = schedule.to_text()
        if text in tried:
            continue
        tried.add(text)
        better, value = refine(
            schedule,
            costs,
            cap,
            refine_evals,
            allow_pairs=costs.pair < costs.f + costs.b,
            max_deferred=max_deferred,
        )
        built += 1
        if value < best_makespan - 1e-9:
            best_makespan, best_origin, best = value, origin + " + local search", better

    if pairs or (pairs is None and costs.parts is not None):
        # the pairs change the critical path: pair the three best candidates, keep the
        # fastest of all
        top = [(best_makespan, best_origin, best)]
        top += [f for f in found if f[2] is not best][:2]
        for _, origin, schedule in top:
            paired = pair_steps(schedule, costs.parts, comm=costs.comm)
            if paired is schedule or _memory(paired, costs) > cap + 1e-9 or (
                    max_deferred is not None and deferred_peak(paired) > max_deferred):
                continue
            value = simulate(paired, costs).makespan
            if value < best_makespan - 1e-9:
                best_makespan, best_origin, best = value, origin + " + F&F/B&B pairs", paired
    auto = Schedule("auto", best.layout, best.chunks_per_stream, best.steps)
    validate(auto)
    result = simulate(auto, costs)
    return AutoSchedule(
        schedule=auto,
        makespan=result.makespan,
        peak=max(result.peak_activations, default=0),
        limit=cap,
        deferred=deferred_peak(auto),
        origin=best_origin,
        seeds=seeds,
        candidates=built,
        seconds=time.perf_counter() - t0,
        memory=max(result.peak_memory, default=0.0),
        w_memory=costs.w_memory,
    )


def autoschedule(
    num_ranks: int,
    num_chunks: int,
    costs: Costs,
    *,
    limit: float | None = None,
    layout: str = "v",
    max_deferred: int | None = None,
) -> Schedule:
    """The schedule :func:`search` finds (valid, runnable by ``Pipeline(modules, schedule)``)."""
    found = search(num_ranks, num_chunks, costs, limit=limit, layout=layout,
                   max_deferred=max_deferred)  # fmt: skip
    return found.schedule
