"""Chrome / Perfetto trace-event JSON of a timeline."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..schedules.schedule import Schedule
from ..simulation import TimedStep
from ._common import KIND_NAMES, Segment, direction_names, segments

if TYPE_CHECKING:
    from ._common import TimedWait

__all__ = ["chrome_trace", "write_trace"]

COMPUTE_TID = 0
WAIT_TID = 1


def _action_event(seg: Segment, us: float, names: list[str]) -> dict[str, Any]:
    args: dict[str, Any] = {
        "token": seg.token,
        "kind": KIND_NAMES[seg.action.op],
        "phase": seg.action.phase,
        "micro_batch": seg.action.chunk,
        "global_micro_batch": seg.global_chunk,
        "stream": seg.stream,
        "stage": seg.stage,
    }
    if seg.direction < len(names) and names[seg.direction]:
        args["direction"] = names[seg.direction]
    if seg.pair is not None:
        args["pair"] = str(seg.pair)
        args["pair_half"] = "forward" if seg.half == 1 else "backward"
    return {
        "name": seg.token,
        "cat": seg.action.op.value,
        "ph": "X",
        "pid": seg.row,
        "tid": COMPUTE_TID,
        "ts": seg.start * us,
        "dur": (seg.end - seg.start) * us,
        "args": args,
    }


def chrome_trace(
    timeline: Sequence[Sequence[TimedStep]],
    schedule: Schedule,
    waits: Sequence[Sequence[TimedWait]] | None = None,
    us_per_unit: float = 1000.0,
) -> dict[str, Any]:
    """Build the trace-event JSON object of ``timeline``.

    Args:
        timeline: per rank, the timed steps (simulated or measured).
        schedule: the schedule the timeline runs.
        waits: optional per-rank waits (a ``recv wait`` thread per rank).
        us_per_unit: microseconds per unit of the timeline's times.

    Returns:
        ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``
        with one category-``F``/``B``/``I``/``W`` event per action, one
        category-``pair`` event per overlapped pair and one ``wait`` event per wait.
    """
    names = direction_names(schedule)
    events: list[dict[str, Any]] = []
    rows = max(len(timeline), schedule.num_ranks)
    for row in range(rows):
        stages = (
            ", ".join(f"S{s}" for s in schedule.layout.rank_stages[row])
            if (row < schedule.num_ranks)
            else ""
        )
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": row,
                "tid": 0,
                "args": {"name": f"rank {row}" + (f" ({stages})" if stages else "")},
            }
        )
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": row,
                "tid": 0,
                "args": {"sort_index": row},
            }
        )
        events.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": row,
                "tid": COMPUTE_TID,
                "args": {"name": "compute"},
            }
        )
        if waits is not None:
            events.append(
                {
                    "name": "thread_name",
                    "ph": "M",
                    "pid": row,
                    "tid": WAIT_TID,
                    "args": {"name": "recv wait"},
                }
            )
    for row, steps in enumerate(timeline):
        for timed in steps:
            segs = segments(row, timed, schedule)
            if len(segs) == 2:
                events.append(
                    {
                        "name": str(timed.step),
                        "cat": "pair",
                        "ph": "X",
                        "pid": row,
                        "tid": COMPUTE_TID,
                        "ts": timed.start * us_per_unit,
                        "dur": (timed.end - timed.start) * us_per_unit,
                        "args": {
                            "token": str(timed.step),
                            "kind": "overlapped forward & backward",
                            "forward": str(segs[0].action),
                            "backward": str(segs[1].action),
                        },
                    }
                )
            events.extend(_action_event(seg, us_per_unit, names) for seg in segs)
    for row, row_waits in enumerate(waits or ()):
        for w in row_waits:
            events.append(
                {
                    "name": w.label,
                    "cat": "wait",
                    "ph": "X",
                    "pid": row,
                    "tid": WAIT_TID,
                    "ts": w.start * us_per_unit,
                    "dur": (w.end - w.start) * us_per_unit,
                    "args": {"label": w.label, "rank": w.rank},
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": schedule.name,
            "num_ranks": schedule.num_ranks,
            "num_chunks": schedule.num_chunks,
        },
    }


def write_trace(
    timeline: Sequence[Sequence[TimedStep]],
    schedule: Schedule,
    path: str | os.PathLike[str],
    waits: Sequence[Sequence[TimedWait]] | None = None,
    us_per_unit: float = 1000.0,
) -> None:
    """Write :func:`chrome_trace` of ``timeline`` as JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(chrome_trace(timeline, schedule, waits, us_per_unit), fh)
