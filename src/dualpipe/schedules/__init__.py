"""Schedules as data: actions, layouts, generators, the registry. Pure Python, no torch."""

# The generator modules register their schedules on import; the registry fixes the
# order listings show (registry.LISTING_ORDER), so the import order does not matter.
from ..errors import ScheduleError
from .actions import (
    Action,
    Op,
    Overlap,
    PairKind,
    Step,
    format_step,
    parse_step,
    step_actions,
)
from .controllable import v_half, v_min
from .dependency import Dependency, dependency
from .generators import dualpipe, dualpipev, gpipe, one_f_one_b, zb1p
from .interleaved import interleaved_1f1b
from .layout import (
    Layout,
    Position,
    dualpipe_layout,
    dualpipev_layout,
    interleaved_layout,
    linear_layout,
)
from .registry import SCHEDULES, ScheduleSpec, generate, layout_for, schedule_names, spec, specs
from .schedule import Schedule
from .torch_format import from_torch_actions, from_torch_csv, to_torch_actions, to_torch_csv
from .validate import problems, validate
from .zbv import zbv

__all__ = [
    "Action",
    "Op",
    "Overlap",
    "PairKind",
    "Step",
    "format_step",
    "parse_step",
    "step_actions",
    "Dependency",
    "dependency",
    "SCHEDULES",
    "ScheduleSpec",
    "generate",
    "schedule_names",
    "spec",
    "specs",
    "dualpipe",
    "dualpipev",
    "gpipe",
    "one_f_one_b",
    "zb1p",
    "zbv",
    "v_half",
    "v_min",
    "interleaved_1f1b",
    "Layout",
    "Position",
    "dualpipe_layout",
    "dualpipev_layout",
    "interleaved_layout",
    "linear_layout",
    "Schedule",
    "ScheduleError",
    "layout_for",
    "from_torch_actions",
    "from_torch_csv",
    "to_torch_actions",
    "to_torch_csv",
    "problems",
    "validate",
]
