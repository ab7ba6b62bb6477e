"""Point-to-point messages between the ranks of a pipeline: wire format, completion
handles, bounded waits and the backends (a process group, or threads of one process)."""

from __future__ import annotations

from .base import DRAIN_SECONDS, BaseTransport
from .pending import Pending
from .process_group import Transport
from .wire import TensorMeta, decode_header, encode_header

__all__ = [
    "DRAIN_SECONDS",
    "BaseTransport",
    "Pending",
    "TensorMeta",
    "Transport",
    "decode_header",
    "encode_header",
]
