"""Schedule files: the text, JSON and PyTorch CSV formats, read and written."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ScheduleError
from .registry import SCHEDULES, layout_for
from .schedule import Schedule
from .torch_format import from_torch_csv, to_torch_csv

__all__ = ["FORMATS", "dumps", "loads", "load"]

FORMATS = ("text", "json", "torch")
"""What :func:`dumps` writes: ``rank R: ...`` lines, ``Schedule.to_json()``, PyTorch's CSV."""


def dumps(schedule: Schedule, fmt: str) -> str:
    """``schedule`` in the format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "text":
        return schedule.to_text()
    if fmt == "json":
        return schedule.to_json()
    if fmt == "torch":
        return to_torch_csv(schedule).replace("\r\n", "\n")
    raise ScheduleError(f"unknown schedule format {fmt!r}; choose one of {', '.join(FORMATS)}")


def loads(text: str, name: str = "custom", layout: str | None = None,
          ranks: int | None = None, csv: bool = False) -> Schedule:
    """A schedule from the text of a file: PyTorch's CSV when ``csv`` (its rows give the
    layout unless ``layout`` and ``ranks`` are given), JSON when it starts with ``{``, else
    ``rank R: ...`` lines on the registered schedule ``layout``'s layout (``ranks``
    defaults to the number of lines). ``name`` names a CSV schedule."""
    if csv:
        fixed = layout_for(layout, ranks) if layout and ranks else None
        return from_torch_csv(text, fixed, name=name)
    if text.lstrip().startswith("{"):
        try:
            return Schedule.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ScheduleError(f"not valid JSON: {exc}") from None
        except (KeyError, TypeError) as exc:
            raise ScheduleError(f"not a schedule JSON ({exc!r} missing or wrong)") from None
    if not layout:
        raise ScheduleError(
            "a text schedule needs a layout name: dualpipe, dualpipev, 1f1b, ... (--layout NAME "
            "on the command line)"
        )
    key = layout.lower()
    if key not in SCHEDULES:
        raise ScheduleError(f"unknown layout {layout!r}; choose one of {', '.join(SCHEDULES)}")
    if ranks is None:
        ranks = sum(1 for line in text.splitlines() if line.strip())
    return Schedule.from_text(text, layout_for(key, ranks), name=key)


def load(path: str | Path, layout: str | None = None, ranks: int | None = None) -> Schedule:
    """:func:`loads` of the file at ``path`` (PyTorch's CSV when it ends in ``.csv``, named
    after the file); errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScheduleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return loads(text, path.stem, layout, ranks, csv=path.suffix == ".csv")
    except ScheduleError as exc:
        if str(exc).startswith(("not valid JSON", "not a schedule JSON")):
            raise ScheduleError(f"{path}: {exc}") from None
        raise
