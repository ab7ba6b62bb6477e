"""Cost-model simulator: when would each step of a schedule run?."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import ScheduleError
from .partcosts import PartCosts, WeightItem, interleave
from .schedules.actions import Action, Op, Overlap, PairKind, Step, step_actions
from .schedules.dependency import dependency
from .schedules.schedule import Schedule

__all__ = [
    "Costs", "TimedStep", "SimResult", "simulate", "step_duration", "chains", "seed_bubble",
    "peak_activations", "peak_memory", "w_state", "DEFAULT_W_MEMORY",
]

DEFAULT_W_MEMORY = 1.0
"""State one deferred weight gradient holds, in units of one stage activation, when none is
given: what the ``W`` of a stage of linear layers reads (each layer's input and output
gradient) is about what its forward saved (each layer's input and the input of the
activation function after it)."""


@dataclass(frozen=True)
class Costs:
    """Per-action times (any unit, milliseconds in the CLI).

    Attributes:
        f: forward of one stage for one micro-batch.
        b: full backward (input + weight gradients).
        w: weight-gradient part of a backward; an input-only backward takes ``b - w``.
        fb: an overlapped forward+backward pair; defaults to ``f + b``.
        comm: latency of a message between two different ranks.
        parts: the stage's per-part costs (:class:`~dualpipe.partcosts.PartCosts`):
            then ``f``, ``b`` and ``w`` are derived from them (whatever was passed) and
            each pair's time is its parts interleaved (``fb`` must not be given).
        w_memory: memory, not time: what one deferred weight gradient holds between its
            ``I`` and its ``W``, as a fraction of one stage's activations for one
            micro-batch (the unit of ``peak_activations``); one number for every stage
            or one per model stage (a tuple indexed by stage). Measure it on a stage with
            :func:`dualpipe.autograd.deferred_fraction`.
    """

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0
    parts: PartCosts | None = None
    w_memory: float | tuple[float, ...] = DEFAULT_W_MEMORY

    def __post_init__(self) -> None:
        if isinstance(self.w_memory, (list, tuple)):
            object.__setattr__(self, "w_memory", tuple(float(x) for x in self.w_memory))
            values: tuple[float, ...] = self.w_memory
        else:
            values = (self.w_memory,)
        if not values or not all(x >= 0 for x in values):
            raise ValueError(f"w_memory must be >= 0 (one number or one per stage), got "
                             f"{self.w_memory}")
        if self.parts is not None:
            if self.fb is not None:
                raise ValueError("give either fb or parts: with parts, a pair's time is derived")
            object.__setattr__(self, "f", self.parts.forward)
            object.__setattr__(self, "b", self.parts.backward)
            object.__setattr__(self, "w", self.parts.weight)
        for name in ("f", "b", "w", "comm"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"cost {name} must be >= 0, got {value}")
        if self.fb is not None and not self.fb >= 0:
            raise ValueError(f"cost fb must be >= 0, got {self.fb}")
        if self.w > self.b:
            raise ValueError(f"cost w ({self.w}) cannot exceed the full backward b ({self.b})")

    @property
    def pair(self) -> float:
        """Time of an overlapped pair (from ``parts``, else ``fb``, else ``f + b``)."""
        if self.parts is not None:
            return self.parts.pair(full_backward=True)
        return self.f + self.b if self.fb is None else self.fb

    @property
    def pair_input(self) -> float:
        """Time of a pair whose backward is input-only (from ``parts``, else ``pair - w``)."""
        if self.parts is not None:
            return self.parts.pair(full_backward=False)
        return self.pair - self.w


def chains(step: Step) -> tuple[str, ...]:
    """What a step runs part by part, in the engine's order (:func:`interleave`'s
    ``chains``): an F&B pair's backward first, else the pair's order; ``()`` for a ``W``."""
    return tuple(a.op.value for a in _engine_order(step) if a.op is not Op.WEIGHT)


def step_duration(step: Step, costs: Costs) -> float:
    """Time a step takes under ``costs`` on its own (no weight work of earlier steps
    filling its waits: that is :func:`simulate`'s, which knows what is pending)."""
    if costs.parts is not None and not (isinstance(step, Action) and step.op is Op.WEIGHT):
        return max((iv.end for iv in interleave(costs.parts, chains(step))), default=0.0)
    if isinstance(step, Overlap):
        if step.kind is PairKind.FB:
            return costs.pair_input if step.second.op is Op.INPUT else costs.pair
        return sum(step_duration(a, costs) for a in step_actions(step))
    return {
        Op.FORWARD: costs.f,
        Op.BACKWARD: costs.b,
        Op.INPUT: costs.b - costs.w,
        Op.WEIGHT: costs.w,
    }[step.op]


class _Pending:
    """A rank's deferred weight work under per-part costs: what an ``I`` left (one item
    per part), run by its ``W`` or, earlier, in the waits of the rank's parted steps."""

    def __init__(self, parts: PartCosts) -> None:
        self.parts = parts
        self.items: list[WeightItem] = []

    def duration(self, step: Step) -> float:
        """Time of ``step``, taking (and leaving) pending items as the engine does."""
        if isinstance(step, Action) and step.op is Op.WEIGHT:
            key = (step.phase, step.chunk)
            mine = [it for it in self.items if it.owner == key]
            self.items = [it for it in self.items if it.owner != key]
            return sum(it.time for it in mine)
        owners = tuple((a.phase, a.chunk) for a in _engine_order(step))
        ivs = interleave(self.parts, chains(step), self.items, owners)
        return max((iv.end for iv in ivs), default=0.0)


def _engine_order(step: Step) -> tuple[Action, ...]:
    """The step's actions in the order the engine runs their parts."""
    acts = step_actions(step)
    if isinstance(step, Overlap) and step.kind is PairKind.FB:
        return acts[::-1]
    return acts


@dataclass(frozen=True)
class TimedStep:
    """A step of ``rank`` placed on the time axis."""

    rank: int
    step: Step
    start: float
    end: float


@dataclass
class SimResult:
    """Outcome of :func:`simulate`."""

    schedule: Schedule
    costs: Costs
    timeline: list[list[TimedStep]]
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    peak_memory: list[float] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (no timeline)."""
        return {
            "schedule": self.schedule.name,
            "num_ranks": self.schedule.num_ranks,
            "num_chunks": self.schedule.num_chunks,
            "makespan": self.makespan,
            "busy": self.busy,
            "bubble": self.bubble,
            "peak_activations": self.peak_activations,
            "peak_memory": self.peak_memory,
            "w_memory": (
                list(self.costs.w_memory)
                if isinstance(self.costs.w_memory, tuple)
                else self.costs.w_memory
            ),
        }


def _key(schedule: Schedule, rank: int, action: Action) -> tuple[int, int, int]:
    """(stream, position, chunk): identifies one stage of one micro-batch."""
    stream, pos = schedule.layout.locate(rank, action.phase)
    return stream, pos, action.chunk


def simulate(schedule: Schedule, costs: Costs) -> SimResult:
    """Place every step of ``schedule`` on the time axis under ``costs``.

    The simulator trusts the schedule's structure (run
    :func:`dualpipe.schedules.validate` on hand-made schedules first); it only
    detects schedules that cannot make progress.

    Raises:
        ScheduleError: if some rank can never proceed (a dependency cycle, or an
            action whose input is never produced).
    """
    layout = schedule.layout
    n = schedule.num_ranks
    done_f: dict[tuple[int, int, int], tuple[float, int]] = {}  # key -> (end, rank)
    done_b: dict[tuple[int, int, int], tuple[float, int]] = {}
    cursor = [0] * n
    free_at = [0.0] * n
    timeline: list[list[TimedStep]] = [[] for _ in range(n)]
    pending = [_Pending(costs.parts) for _ in range(n)] if costs.parts is not None else None

    def ready_time(rank: int, action: Action) -> float | None:
        need = dependency(layout, rank, action)
        if need is None or need.op is Op.INPUT:  # a W's I ran earlier on this rank
            return 0.0
        dep = (done_f if need.op is Op.FORWARD else done_b).get(need.key)
        if dep is None:
            return None
        return dep[0] + (costs.comm if dep[1] != rank else 0.0)

    remaining = sum(len(s) for s in schedule.steps)
    while remaining:
        progressed = False
        for rank in range(n):
            while cursor[rank] < len(schedule.steps[rank]):
                step = schedule.steps[rank][cursor[rank]]
                times = [ready_time(rank, a) for a in step_actions(step)]
                if any(t is None for t in times):
                    break
                start = max([free_at[rank], *[t for t in times if t is not None]])
                end = start + (pending[rank].duration(step) if pending is not None
                               else step_duration(step, costs))
                for a in step_actions(step):
                    if a.op is Op.FORWARD:
                        done_f[_key(schedule, rank, a)] = (end, rank)
                    elif a.op.is_backward:
                        done_b[_key(schedule, rank, a)] = (end, rank)
                timeline[rank].append(TimedStep(rank, step, start, end))
                free_at[rank] = end
                cursor[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {
                r: str(schedule.steps[r][cursor[r]])
                for r in range(n)
                if cursor[r] < len(schedule.steps[r])
            }
            raise ScheduleError(f"schedule cannot make progress; blocked steps: {stuck}")

    makespan = max(free_at, default=0.0)
    busy = [sum(t.end - t.start for t in row) for row in timeline]
    return SimResult(
        schedule=schedule,
        costs=costs,
        timeline=timeline,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - x for x in busy],
        peak_activations=[peak_activations(schedule, r) for r in range(n)],
        peak_memory=[peak_memory(schedule, r, costs.w_memory) for r in range(n)],
    )


def peak_activations(schedule: Schedule, rank: int) -> int:
    """Most micro-batches with a started forward and an unfinished backward on ``rank``.

    A rank is sequential, so issue order is time order; in a pair the forward
    counts before the backward releases its micro-batch.
    """
    live = peak = 0
    for action in schedule.actions(rank):
        if action.op is Op.FORWARD:
            live += 1
            peak = max(peak, live)
        elif action.op.is_backward:
            live -= 1
    return peak


def w_state(w_memory: float | Sequence[float], stage: int) -> float:
    """What one deferred weight gradient of model stage ``stage`` holds, in activation
    units (``w_memory``: one number for all stages, or one per stage)."""
    if isinstance(w_memory, (int, float)):
        return float(w_memory)
    if not 0 <= stage < len(w_memory):
        raise ValueError(f"w_memory gives {len(w_memory)} stages, stage {stage} has none")
    return float(w_memory[stage])


def peak_memory(
    schedule: Schedule, rank: int, w_memory: float | Sequence[float] = DEFAULT_W_MEMORY
) -> float:
    """Most memory ``rank`` holds, in units of one stage's activations for one micro-batch.

    Like :func:`peak_activations`, plus the state of deferred weight gradients: a forward
    takes one unit, a full backward (``B``) frees it, an input-only backward (``I``) frees
    it but keeps ``w_state`` units until its ``W`` frees them. In a pair the forward
    counts before the backward frees anything. With ``w_memory = 0`` this is
    ``peak_activations``; a schedule without ``I`` gets the same value for any
    ``w_memory``.
    """
    layout = schedule.layout
    live = top = 0.0
    for action in schedule.actions(rank):
        op = action.op
        if op is Op.FORWARD:
            live += 1.0
        elif op is Op.BACKWARD:
            live -= 1.0
        elif op is Op.INPUT:
            live += w_state(w_memory, layout.stage(rank, action.phase)) - 1.0
        else:
            live -= w_state(w_memory, layout.stage(rank, action.phase))
        top = max(top, live)
    return round(top, 9)


def seed_bubble(name: str, num_stages: int, costs: Costs) -> float | None:
    """The seed table's bubble formula for ``num_stages`` pipeline stages, or None
    where the table gives none (GPipe).

    The simulator reproduces these exactly only where their assumptions hold (all
    with ``comm = 0``): 1F1B always; ZB1P when ``f = b - w = w``; DualPipe and
    DualPipeV when ``f = b - w``, ``w <= b - w`` and ``max(f, b) <= fb <= f + b``.
    With ``f > b - w`` or ``w > b - w`` the simulated DualPipe bubble is larger: the
    measured rule is ``(PP/2-1)(fb + b - 3w + (f - (b-w)) + max(0, w - (b-w)))`` for
    ``f >= b - w`` (see ``tests/test_simulation.py``).
    """
    pp = num_stages
    f, b, w, fb = costs.f, costs.b, costs.w, costs.pair
    if name == "1f1b":
        return (pp - 1) * (f + b)
    if name == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if name in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (fb + b - 3 * w)
    return None
