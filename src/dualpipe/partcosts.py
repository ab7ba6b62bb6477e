"""Per-part costs of a parted stage on two resources per rank (compute, communication),
and the F&B pair's time derived from them by replaying the overlap engine's order."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PartCosts", "PartInterval", "WeightItem", "CHAINS", "pair_intervals", "interleave",
           "parse_parts"]


@dataclass(frozen=True)
class PartInterval:
    """One interval of a simulated pair: ``resource`` is ``"compute"`` or ``"comm"``;
    ``label`` e.g. ``"F1"`` (forward part 1), ``"B2"`` (input backward of part 2), ``"W2"``
    (its weight gradient), ``"F0>"`` / ``"B2>"`` (the communication after that part)."""

    resource: str
    label: str
    start: float
    end: float


@dataclass(frozen=True)
class PartCosts:
    """The costs of one stage written as parts (any unit, milliseconds in the CLI).

    With ``n`` computation parts separated by ``n - 1`` communications:

    Attributes:
        f: forward compute time of each computation part (``n`` values).
        f_comm: forward communication after each part but the last (``n - 1``).
        b: input-gradient backward compute of each part, in forward order (``n``).
        w: weight-gradient compute of each part (``n``; deferrable).
        b_comm: the backward's communication of each boundary (``n - 1``), in forward
            order (the backward runs them last first).

    :attr:`forward`, :attr:`backward` and :attr:`weight` are the sums (a single F's time
    when nothing else is pending: ``sum(f) + sum(f_comm)``). A step's time is what the
    engine's order gives on one compute resource and one communication link
    (communications in launch order, one at a time, pending weight work in the waits);
    see :func:`interleave` and :meth:`pair`.
    """

    f: tuple[float, ...]
    f_comm: tuple[float, ...]
    b: tuple[float, ...]
    w: tuple[float, ...]
    b_comm: tuple[float, ...]

    def __post_init__(self) -> None:
        n = len(self.f)
        if n < 1:
            raise ValueError("a parted stage needs at least one computation part")
        for name, want in (("f_comm", n - 1), ("b", n), ("w", n), ("b_comm", n - 1)):
            if len(getattr(self, name)) != want:
                raise ValueError(
                    f"part costs: {name} needs {want} values for {n} computation parts, "
                    f"got {len(getattr(self, name))}"
                )
        for name in ("f", "f_comm", "b", "w", "b_comm"):
            if any(not v >= 0 for v in getattr(self, name)):
                raise ValueError(f"part costs: {name} must be >= 0, got {getattr(self, name)}")

    @property
    def forward(self) -> float:
        """A single forward, part by part."""
        return sum(self.f) + sum(self.f_comm)

    @property
    def backward(self) -> float:
        """A single full backward, part by part."""
        return sum(self.b) + sum(self.w) + sum(self.b_comm)

    @property
    def weight(self) -> float:
        """The weight-gradient work of one backward."""
        return sum(self.w)

    def pair(self, full_backward: bool = True) -> float:
        """Time of an F&B pair (see :func:`pair_intervals`)."""
        return max((iv.end for iv in pair_intervals(self, full_backward)), default=0.0)


CHAINS = ("F", "B", "I")
"""What one micro-batch of a step runs part by part: a forward, a full backward, an
input-only backward."""


@dataclass
class WeightItem:
    """One part's deferred weight-gradient work, waiting on a rank: ``owner`` names the
    action whose ``W`` would run it (e.g. ``(phase, chunk)``), ``time`` its cost."""

    owner: object
    time: float


def pair_intervals(costs: PartCosts, full_backward: bool = True) -> list[PartInterval]:
    """The intervals of one F&B pair in the engine's order (:func:`interleave` of the
    backward, then the forward)."""
    return interleave(costs, ("B" if full_backward else "I", "F"))


def interleave(costs: PartCosts, chains: tuple[str, ...],
               pool: list[WeightItem] | None = None,
               owners: tuple[object, ...] | None = None) -> list[PartInterval]:
    """The intervals of one step whose ``chains`` (each ``"F"``, ``"B"`` or ``"I"``, one
    per micro-batch: one chain for a single action, two for a pair) run as the engine
    runs them: one part of each chain in turn, in the order given (a pair's backward
    first); a part waits for its own micro-batch's communication, and while it waits the
    oldest pending weight work runs.

    Pending weight work: without a ``pool``, the parts of full backwards (``"B"``) only,
    whatever is left running at the end (an ``"I"`` keeps its weight work for its
    ``W``). With a ``pool`` (a rank's deferred work, oldest first, as
    :func:`dualpipe.simulation.simulate` keeps it): the pool's items first, then every
    part's weight work as its backward part finishes; the items of ``"I"`` chains
    (owned by ``owners[i]``) that did not run stay in the pool, the pool's items that ran
    are removed from it. Communications run one at a time in launch order on one link.

    Labels: ``F1`` (forward part 1), ``B2`` (backward part 2), ``W2`` (its weight work),
    ``F0>`` / ``B2>`` (the communication after that part); the second chain of a kind is
    primed (``F'1``), weight work of the pool is ``W*``."""
    for chain in chains:
        if chain not in CHAINS:
            raise ValueError(f"a chain is one of {', '.join(CHAINS)}, got {chain!r}")
    n = len(costs.f)
    out: list[PartInterval] = []
    now = 0.0
    link = 0.0  # when the communication link is free
    filling = pool is not None
    waiting: list[WeightItem] = pool if pool is not None else []
    names: list[str] = []
    for chain in chains:
        letter = "B" if chain == "I" else chain
        names.append(letter + "'" * sum(1 for x in names if x[0] == letter))
    ready = [0.0] * len(chains)
    steps = [0] * len(chains)
    made: list[tuple[str, WeightItem]] = []
    mine: dict[int, str] = {}  # id of an item made in this step -> its label

    def fill_one() -> None:
        nonlocal now
        item = waiting.pop(0)
        out.append(PartInterval("compute", mine.get(id(item), "W*"), now, now + item.time))
        now += item.time

    def compute(label: str, time: float, after: float) -> None:
        nonlocal now
        while waiting and now < after:
            fill_one()
        now = max(now, after)
        out.append(PartInterval("compute", label, now, now + time))
        now += time

    def launch(chain: int, label: str, time: float) -> None:
        nonlocal link
        start = max(now, link)
        link = start + time
        out.append(PartInterval("comm", label, start, link))
        ready[chain] = link

    while any(k < n for k in steps):
        for c, chain in enumerate(chains):
            if steps[c] >= n:
                continue
            name = names[c]
            if chain == "F":
                k = steps[c]
                compute(f"{name}{k}", costs.f[k], ready[c])
                if k < n - 1:
                    launch(c, f"{name}{k}>", costs.f_comm[k])
            else:
                k = n - 1 - steps[c]
                compute(f"{name}{k}", costs.b[k], ready[c])
                if chain == "B" or filling:
                    owner = owners[c] if owners is not None and chain == "I" else None
                    item = WeightItem(owner, costs.w[k])
                    mine[id(item)] = f"W{name[1:]}{k}"
                    made.append((chain, item))
                    waiting.append(item)
                if k > 0:
                    launch(c, f"{name}{k}>", costs.b_comm[k - 1])
            steps[c] += 1
    for chain, item in made:  # a full backward ends with its weight work done
        if chain == "B" and any(x is item for x in waiting):
            waiting[:] = [x for x in waiting if x is not item]
            out.append(PartInterval("compute", mine[id(item)], now, now + item.time))
            now += item.time
    return out


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def parse_parts(forward: str, backward: str, weight: str) -> PartCosts:
    """Part costs from the CLI's strings: ``forward`` and ``backward`` alternate compute
    and communication times, starting and ending with compute (``"2,1,2,1,1"``: three
    parts, two communications); ``weight`` gives one weight-gradient time per part."""
    fwd, bwd = _floats(forward, "--part-f"), _floats(backward, "--part-b")
    for name, seq in (("--part-f", fwd), ("--part-b", bwd)):
        if len(seq) % 2 == 0:
            raise ValueError(
                f"{name}: alternate compute and communication times, starting and ending "
                f"with compute (an odd count), got {len(seq)} values"
            )
    return PartCosts(fwd[0::2], fwd[1::2], bwd[0::2], _floats(weight, "--part-w"), bwd[1::2])
