"""Run a function on several local processes joined by gloo on 127.0.0.1."""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .errors import DistributedRunError

__all__ = ["run_distributed", "free_port", "DistributedRunError"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    threads: int | None,
) -> None:
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
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


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    threads: int | None = 1,
    context: Any = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes.

    ``fn`` must be importable (defined at module level). Returns the per-rank
    results in rank order; raises :class:`DistributedRunError` with every failing
    rank's traceback if any rank fails or the run exceeds ``timeout`` seconds (once
    one rank has failed, the others get a few seconds to report, then all stop).
    ``threads`` sets ``torch.set_num_threads`` in each process (None: leave it).
    ``context`` is the multiprocessing context (default: spawn; a forkserver that
    preloads torch starts ranks much faster).
    """
    import torch.multiprocessing as mp

    ctx = context if context is not None else mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, timeout, fn, args, results, threads),
            daemon=True,
        )
        for r in range(world_size)
    ]
    env_before = os.environ.get("OMP_NUM_THREADS")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        for p in procs:
            p.start()
    finally:
        if threads is not None:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before
    deadline = time.monotonic() + timeout
    out: dict[int, tuple[bool, Any]] = {}
    try:
        _collect(procs, results, out, world_size, deadline)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    missing = [r for r in range(world_size) if r not in out]
    failed = {r: v for r, (ok, v) in out.items() if not ok}
    if missing or failed:
        parts = [f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())]
        if missing:
            parts.append(f"ranks {missing} did not finish within {timeout:.0f} s")
        raise DistributedRunError("\n".join(parts))
    return [out[r][1] for r in range(world_size)]


def _collect(
    procs: list[Any], results: Any, out: dict[int, tuple[bool, Any]], world_size: int,
    deadline: float,
) -> None:
    """Gather ``(rank, ok, value)`` reports until all arrived, one failed, or time is up."""
    while len(out) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = results.get(timeout=min(0.5, deadline - time.monotonic()))
        except (queue.Empty, ValueError):
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
            if dead:
                time.sleep(0.5)  # let a last report arrive
                _drain(results, out)
                for r in dead:
                    out.setdefault(r, (False, f"process exited with code {procs[r].exitcode}"))
                if any(not ok for ok, _ in out.values()):
                    return  # the others will hang or time out: stop now
            continue
        out[rank] = (ok, value)
        if not ok:
            grace = min(deadline, time.monotonic() + 3.0)  # let the others report their side
            while len(out) < world_size and time.monotonic() < grace:
                _drain(results, out, wait=0.2)
            return


def _drain(results: Any, out: dict[int, tuple[bool, Any]], wait: float = 0.0) -> None:
    try:
        while True:
            rank, ok, value = results.get(timeout=wait) if wait else results.get_nowait()
            out[rank] = (ok, value)
            if wait:
                return
    except queue.Empty:
        return
