"""dualpipe: DualPipe and DualPipeV pipeline parallelism for PyTorch.

``import dualpipe`` does not import torch; the runtime classes load on first use,
so schedules, the simulator and the CLI work without it.
"""

from __future__ import annotations

from typing import Any

from . import integrations as integrations  # registers the FSDP2 extension (no torch)
from .schedules import Schedule, ScheduleError, generate
from .simulation import Costs, SimResult, simulate

__version__ = "0.1.0"

_RUNTIME = {
    "DualPipe": "dualpipe.runtime.pipeline",
    "DualPipeV": "dualpipe.runtime.pipeline",
    "Pipeline": "dualpipe.runtime.pipeline",
    "PipelineError": "dualpipe.runtime.p2p",
    "RemoteFailure": "dualpipe.runtime.p2p",
    "WeightGradStore": "dualpipe.utils",
    "defer_weight_grad": "dualpipe.runtime.split_backward",
    "set_p2p_tensor_dtype": "dualpipe.runtime.declared",
    "set_p2p_tensor_shapes": "dualpipe.runtime.declared",
}

__all__ = [
    "Costs",
    "Schedule",
    "ScheduleError",
    "SimResult",
    "generate",
    "simulate",
    *_RUNTIME,
]


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        import importlib

        return getattr(importlib.import_module(_RUNTIME[name]), name)
    raise AttributeError(f"module 'dualpipe' has no attribute {name!r}")
