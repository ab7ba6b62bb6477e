"""Start a fresh gloo process group on local processes for every benchmark configuration.

Like :func:`dualpipe.testing.run_distributed`, but the ranks are forked from a
*forkserver* that has already imported torch, so starting 8 ranks on a 2-core
machine takes a fraction of a second instead of ~10 s of repeated ``import torch``.
Each configuration still gets its own processes and its own process group.

Everything is bounded: ``timeout`` covers the whole run (ranks still alive then are
killed), and the process group's own timeout is set to the same value.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any

from dualpipe.errors import DistributedRunError
from dualpipe.testing import free_port, run_distributed

__all__ = ["LaunchError", "launch", "free_port"]

_CTX: Any = None


LaunchError = DistributedRunError
"""A rank raised, crashed or did not finish in time."""


def _context() -> Any:
    """The forkserver context, with torch preloaded (created once per run)."""
    global _CTX
    if _CTX is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["torch", "torch.distributed", "torch.distributed.pipelining", "bench_workers"]
        )
        _CTX = ctx
    return _CTX


def launch(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined by gloo.

    :func:`dualpipe.testing.run_distributed` on the preloaded forkserver: ``fn`` must
    be importable; returns per-rank results in rank order; raises :class:`LaunchError`
    with the failing ranks' tracebacks if a rank fails or the run exceeds ``timeout``.
    """
    return run_distributed(fn, world_size, *args, timeout=timeout, threads=1,
                           context=_context())
