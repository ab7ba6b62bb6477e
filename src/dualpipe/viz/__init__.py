"""Pictures of schedules: terminal text, PNG, Chrome/Perfetto traces, the seed's table.

Every renderer takes a *timeline* (one row per rank of
:class:`~dualpipe.simulation.TimedStep`, times in any unit, milliseconds in
practice) and the :class:`~dualpipe.schedules.Schedule` it came from, so the
same functions draw simulated timelines (``simulate(...).timeline``) and
timelines measured by the runtime. Measured timelines may also carry
:class:`TimedWait` rows: time a rank spent blocked on receiving.

Nothing here imports torch; matplotlib is imported only by :func:`render_png`.
"""

from __future__ import annotations

from ._common import TimedWait
from .png import render_png
from .table import compare_table, format_compare_table
from .text import render_text, render_tokens
from .trace import chrome_trace, write_trace

__all__ = [
    "TimedWait",
    "render_text",
    "render_tokens",
    "render_png",
    "chrome_trace",
    "write_trace",
    "compare_table",
    "format_compare_table",
]
