"""PyTorch's pipelining action format: export and import, so a schedule made by either
library runs on the other."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence

from ..errors import ScheduleError
from .actions import Action, Op, Overlap, PairKind, Step, step_actions
from .layout import Layout
from .schedule import Schedule

__all__ = [
    "to_torch_actions",
    "to_torch_csv",
    "from_torch_actions",
    "from_torch_csv",
    "layout_from_stage_ranks",
]

_ACTION = re.compile(r"(\d+)([FIBW])(\d+)")
_OTHER = re.compile(r"\d+(UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B)\d*")
_PAIR = re.compile(r"\((.*)\)OVERLAP_F_B")


def _action_text(layout: Layout, rank: int, action: Action) -> str:
    return f"{layout.stage(rank, action.phase)}{action.op.value}{action.chunk}"


def to_torch_actions(schedule: Schedule) -> list[list[str]]:
    """Per rank, PyTorch's action strings for ``schedule`` (``str(_Action)`` of each)."""
    layout = schedule.layout
    if layout.num_streams != 1:
        raise ScheduleError(
            f"{schedule.name}: PyTorch's format names stages by index, so every stage must"
            f" live on one rank; this layout has {layout.num_streams} streams"
        )
    rows = []
    for rank, steps in enumerate(schedule.steps):
        row = []
        for step in steps:
            if isinstance(step, Overlap) and step.kind is PairKind.FB:
                fwd = _action_text(layout, rank, step.first)
                bwd = _action_text(layout, rank, step.second)
                row.append(f"({fwd};{bwd})OVERLAP_F_B")
            elif isinstance(step, Overlap):  # F+F, B+B: torch's format has no such pair
                row.extend(_action_text(layout, rank, a) for a in step_actions(step))
            else:
                row.append(_action_text(layout, rank, step))
        rows.append(row)
    return rows


def to_torch_csv(schedule: Schedule) -> str:
    """``schedule`` as the CSV PyTorch's ``_dump_csv`` writes and ``_load_csv`` reads."""
    out = io.StringIO()
    writer = csv.writer(out)
    for row in to_torch_actions(schedule):
        writer.writerow(row)
    return out.getvalue()


def layout_from_stage_ranks(stage_ranks: Sequence[int]) -> Layout:
    """One stream through stages ``0 .. S-1``, stage ``s`` on rank ``stage_ranks[s]``;
    each rank's phases number its stages in increasing stage order (so this gives
    :func:`~dualpipe.schedules.layout.dualpipev_layout` for PyTorch's V placement and
    :func:`~dualpipe.schedules.layout.interleaved_layout` for its loop placement)."""
    if not stage_ranks:
        raise ScheduleError("a layout needs at least one stage")
    num_ranks = max(stage_ranks) + 1
    owned: list[list[int]] = [[] for _ in range(num_ranks)]
    for stage, rank in enumerate(stage_ranks):
        owned[rank].append(stage)
    missing = [r for r, stages in enumerate(owned) if not stages]
    if missing:
        raise ScheduleError(f"ranks {missing} hold no stage")
    path = tuple((rank, owned[rank].index(stage)) for stage, rank in enumerate(stage_ranks))
    return Layout(
        num_ranks=num_ranks,
        paths=(path,),
        stages=(tuple(range(len(stage_ranks))),),
        rank_stages=tuple(tuple(stages) for stages in owned),
    )


def _parse_action(text: str, where: str) -> tuple[int, Op, int]:
    match = _ACTION.fullmatch(text.strip())
    if match is None:
        raise ScheduleError(f"{where}: not a compute action: {text!r} (expected e.g. 0F7, 1I3)")
    return int(match.group(1)), Op(match.group(2)), int(match.group(3))


def _parse_cell(text: str, where: str) -> list[tuple[int, Op, int]] | None:
    """The (stage, op, micro-batch) of a cell: one, or two for a pair; None to skip."""
    text = text.strip()
    if not text or text == "None" or _OTHER.fullmatch(text):
        return None
    pair = _PAIR.fullmatch(text)
    if pair is None:
        return [_parse_action(text, where)]
    parts = [_parse_action(p, where) for p in pair.group(1).split(";")]
    if len(parts) != 2 or parts[0][1] is not Op.FORWARD or not parts[1][1].is_backward:
        raise ScheduleError(f"{where}: an OVERLAP_F_B pair must be a forward then a backward")
    return parts


def from_torch_actions(
    rows: Sequence[Sequence[str | None]],
    layout: Layout | None = None,
    num_chunks: int | None = None,
    name: str = "torch",
) -> Schedule:
    """A :class:`Schedule` from PyTorch's per-rank action strings (``str`` of its
    ``_Action``s; ``None`` or empty for idle slots).

    ``layout`` defaults to the one the rows imply (:func:`layout_from_stage_ranks`);
    ``num_chunks`` to one more than the largest micro-batch index.
    """
    parsed: list[list[list[tuple[int, Op, int]]]] = []
    stage_rank: dict[int, int] = {}
    for rank, row in enumerate(rows):
        cells = []
        for col, cell in enumerate(row):
            where = f"rank {rank} column {col}"
            actions = None if cell is None else _parse_cell(str(cell), where)
            if actions is None:
                continue
            for stage, _, _ in actions:
                if stage_rank.setdefault(stage, rank) != rank:
                    raise ScheduleError(
                        f"{where}: stage {stage} appears on ranks {stage_rank[stage]} and {rank}"
                    )
            cells.append(actions)
        parsed.append(cells)
    if layout is None:
        stages = sorted(stage_rank)
        if stages != list(range(len(stages))):
            raise ScheduleError(f"the rows name stages {stages}, not 0..{len(stages) - 1}")
        layout = layout_from_stage_ranks([stage_rank[s] for s in stages])
    if len(parsed) != layout.num_ranks:
        raise ScheduleError(f"{len(parsed)} rows for a layout of {layout.num_ranks} ranks")
    phase_of = {
        (rank, layout.stage(rank, phase)): phase
        for rank in range(layout.num_ranks)
        for phase in range(layout.num_phases)
        if layout.has(rank, phase)
    }
    steps: list[tuple[Step, ...]] = []
    for rank, cells in enumerate(parsed):
        row_steps: list[Step] = []
        for actions in cells:
            made = []
            for stage, op, chunk in actions:
                if (rank, stage) not in phase_of:
                    raise ScheduleError(f"rank {rank} holds no stage {stage} in this layout")
                made.append(Action(op, phase_of[(rank, stage)], chunk))
            row_steps.append(made[0] if len(made) == 1 else Overlap(made[0], made[1]))
        steps.append(tuple(row_steps))
    if num_chunks is None:
        num_chunks = 1 + max(
            (a[2] for cells in parsed for actions in cells for a in actions), default=-1
        )
    return Schedule(name, layout, num_chunks, tuple(steps))


def from_torch_csv(
    text: str, layout: Layout | None = None, num_chunks: int | None = None, name: str = "torch"
) -> Schedule:
    """A :class:`Schedule` from PyTorch's schedule CSV (``_dump_csv`` output, with or
    without communication actions); see :func:`from_torch_actions`."""
    rows = list(csv.reader(io.StringIO(text)))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()  # trailing blank lines
    return from_torch_actions(rows, layout, num_chunks, name)
