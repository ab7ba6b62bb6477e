"""The overlap engine: stages written as computation and communication parts, and pairs
that hide one micro-batch's communication under the other's computation."""

from ..runtime.record import PartEvent
from .asynccomm import AsyncComm, CommCall, InFlight
from .collectives import AllGather, AllReduce, AllToAll, ReduceScatter, exchange_counts
from .engine import (
    BackwardTask,
    ForwardTask,
    Waiter,
    WeightWorks,
    run_backward,
    run_forward,
    run_interleaved,
    run_pair,
)
from .parted import PartedStage
from .plugin import OverlapExtension, is_parted

__all__ = [
    "AllGather",
    "AllReduce",
    "AllToAll",
    "AsyncComm",
    "BackwardTask",
    "CommCall",
    "ForwardTask",
    "OverlapExtension",
    "PartEvent",
    "PartedStage",
    "InFlight",
    "Pending",
    "ReduceScatter",
    "Waiter",
    "WeightWorks",
    "exchange_counts",
    "is_parted",
    "run_backward",
    "run_forward",
    "run_interleaved",
    "run_pair",
]

Pending = InFlight
"""Earlier name of :class:`InFlight` (kept for code written against it)."""
