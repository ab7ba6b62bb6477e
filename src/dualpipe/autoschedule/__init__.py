"""Cost-driven auto-scheduler: the schedule with the shortest simulated step under a memory
limit (how it searches: ``docs/autoschedule.md``). Pure Python, no torch."""

from .listing import Policy, list_schedule
from .measured import costs_from_timeline, message_latency
from .refine import refine
from .search import (
    LAYOUTS,
    AutoSchedule,
    activation_limit,
    autoschedule,
    deferred_peak,
    search,
)

__all__ = [
    "AutoSchedule",
    "LAYOUTS",
    "Policy",
    "activation_limit",
    "autoschedule",
    "costs_from_timeline",
    "deferred_peak",
    "message_latency",
    "list_schedule",
    "refine",
    "search",
]
