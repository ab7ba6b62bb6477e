"""Schedules as data: actions, layouts, generators. Pure Python, no torch."""

from .actions import Action, Op, Overlap, Step, format_step, parse_step, step_actions
from .generators import SCHEDULES, dualpipe, dualpipev, generate, gpipe, one_f_one_b, zb1p
from .layout import Layout, Position, dualpipe_layout, dualpipev_layout, linear_layout
from .schedule import Schedule, ScheduleError, layout_for
from .validate import problems, validate

__all__ = [
    "Action",
    "Op",
    "Overlap",
    "Step",
    "format_step",
    "parse_step",
    "step_actions",
    "SCHEDULES",
    "generate",
    "dualpipe",
    "dualpipev",
    "gpipe",
    "one_f_one_b",
    "zb1p",
    "Layout",
    "Position",
    "dualpipe_layout",
    "dualpipev_layout",
    "linear_layout",
    "Schedule",
    "ScheduleError",
    "layout_for",
    "problems",
    "validate",
]
