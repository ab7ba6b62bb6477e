"""The overlap engine: stages written as computation and communication parts, and F&B
pairs that hide one micro-batch's communication under the other's computation."""

from .collectives import AllGather, AllReduce, AllToAll, ReduceScatter, exchange_counts
from .comm import AsyncComm, CommCall, Pending
from .engine import (
    BackwardTask,
    ForwardTask,
    PartEvent,
    Waiter,
    WeightWorks,
    run_backward,
    run_forward,
    run_pair,
)
from .stage import PartedStage

__all__ = [
    "AllGather",
    "AllReduce",
    "AllToAll",
    "AsyncComm",
    "BackwardTask",
    "CommCall",
    "ForwardTask",
    "PartEvent",
    "PartedStage",
    "Pending",
    "ReduceScatter",
    "Waiter",
    "WeightWorks",
    "exchange_counts",
    "run_backward",
    "run_forward",
    "run_pair",
]
