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
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["LaunchError", "launch", "free_port"]

_CTX: Any = None


class LaunchError(RuntimeError):
    """A rank raised, crashed or did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, False, traceback.format_exc()))


def launch(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined by gloo.

    ``fn`` must be importable (defined at module level). Returns per-rank results in
    rank order; raises :class:`LaunchError` with the failing ranks' tracebacks if a
    rank fails or the run exceeds ``timeout`` seconds.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world_size, port, timeout, fn, args, results),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    out: dict[int, tuple[bool, Any]] = {}
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                if dead:
                    time.sleep(0.5)  # let a last message arrive
                    while True:
                        try:
                            rank, ok, value = results.get_nowait()
                        except queue.Empty:
                            break
                        out[rank] = (ok, value)
                    for r in dead:
                        if r not in out:
                            out[r] = (False, f"process exited with code {procs[r].exitcode}")
                    if any(not ok for ok, _ in out.values()):
                        break  # the others will hang or time out: stop now
                continue
            out[rank] = (ok, value)
            if not ok:
                # give the other ranks a moment to report their side, then stop
                grace = time.monotonic() + 3.0
                while len(out) < world_size and time.monotonic() < grace:
                    try:
                        rank, ok, value = results.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    out[rank] = (ok, value)
                break
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(2.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    missing = [r for r in range(world_size) if r not in out]
    failed = {r: v for r, (ok, v) in out.items() if not ok}
    if missing or failed:
        parts = [f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())]
        if not failed:
            parts = [f"ranks {missing} did not finish within {timeout:.0f} s"]
        raise LaunchError("\n".join(parts))
    return [out[r][1] for r in range(world_size)]
