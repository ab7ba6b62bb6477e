"""Per-part costs of a parted stage on two resources per rank (compute, communication),
and the F&B pair's time derived from them by replaying the overlap engine's order."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PartCosts", "PartInterval", "pair_intervals", "parse_parts"]


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

    A stage's single F costs ``sum(f) + sum(f_comm)``, a full B ``sum(b) + sum(w) +
    sum(b_comm)``, its W ``sum(w)`` (nothing overlaps outside a pair). A pair's time is
    what the engine's order gives on one compute resource and one communication link
    (communications in launch order, one at a time); see :meth:`pair`.
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


def pair_intervals(costs: PartCosts, full_backward: bool = True) -> list[PartInterval]:
    """The intervals of one F&B pair in the engine's order: one step of the backward, one
    of the forward, and so on; a step waits for its own micro-batch's communication,
    running finished parts' weight-gradient work meanwhile (and after the last step)
    when the backward is full; with an input-only backward the weight work is left
    to the later W."""
    n = len(costs.f)
    out: list[PartInterval] = []
    now = 0.0
    link = 0.0  # when the communication link is free
    weights: list[int] = []
    ready = {"B": 0.0, "F": 0.0}
    steps = {"B": 0, "F": 0}

    def compute(label: str, time: float, after: float) -> None:
        nonlocal now
        while full_backward and weights and now < after:
            k = weights.pop(0)
            out.append(PartInterval("compute", f"W{k}", now, now + costs.w[k]))
            now += costs.w[k]
        now = max(now, after)
        out.append(PartInterval("compute", label, now, now + time))
        now += time

    def launch(chain: str, label: str, time: float) -> None:
        nonlocal link
        start = max(now, link)
        link = start + time
        out.append(PartInterval("comm", label, start, link))
        ready[chain] = link

    while steps["B"] < n or steps["F"] < n:
        if steps["B"] < n:
            k = n - 1 - steps["B"]
            compute(f"B{k}", costs.b[k], ready["B"])
            weights.append(k)
            if k > 0:
                launch("B", f"B{k}>", costs.b_comm[k - 1])
            steps["B"] += 1
        if steps["F"] < n:
            k = steps["F"]
            compute(f"F{k}", costs.f[k], ready["F"])
            if k < n - 1:
                launch("F", f"F{k}>", costs.f_comm[k])
            steps["F"] += 1
    if full_backward:
        for k in weights:
            out.append(PartInterval("compute", f"W{k}", now, now + costs.w[k]))
            now += costs.w[k]
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
