"""The overlap engine: stages written as computation and communication parts, and F&B
pairs that hide one micro-batch's communication under the other's computation."""

from ..runtime.record import PartEvent
from .collectives import AllGather, AllReduce, AllToAll, ReduceScatter, exchange_counts
from .comm import AsyncComm, CommCall, Pending
from .engine import (
    BackwardTask,
    ForwardTask,
    Waiter,
    WeightWorks,
    run_backward,
    run_forward,
    run_pair,
)
from .plugin import OverlapExtension, is_parted
from .stage import PartedStage

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
    "Pending",
    "ReduceScatter",
    "Waiter",
    "WeightWorks",
    "exchange_counts",
    "is_parted",
    "run_backward",
    "run_forward",
    "run_pair",
]
