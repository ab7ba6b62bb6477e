"""Pictures of schedules: terminal text, PNG, Chrome/Perfetto traces, the seed's table."""

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
