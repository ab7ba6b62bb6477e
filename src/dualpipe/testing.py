"""Run a function on several local processes joined by gloo on 127.0.0.1.

Used by the test suite, the demo and the benchmarks, and handy for testing your
own stages::

    from dualpipe.testing import run_distributed

    def work(rank: int, world_size: int) -> float:
        ...  # torch.distributed is initialised here
        return 1.0

    results = run_distributed(work, world_size=4, timeout=60)

Everything is bounded: the process group has ``timeout`` seconds per operation,
and the whole run is killed after ``timeout`` seconds with an error naming the
ranks that had not finished.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["run_distributed", "free_port", "DistributedRunError"]


class DistributedRunError(RuntimeError):
    """A rank raised, crashed or did not finish in time."""


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
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    ``fn`` must be importable (defined at module level). Returns the per-rank
    results in rank order; raises :class:`DistributedRunError` with every failing
    rank's traceback if any rank fails or the run exceeds ``timeout`` seconds.
    ``threads`` sets ``torch.set_num_threads`` in each process (None: leave it).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
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
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                if dead and all(p.exitcode not in (0, None) for r, p in enumerate(procs)
                                if r in dead):
                    time.sleep(0.5)  # let a last message arrive
                    if results.empty():
                        for r in dead:
                            out[r] = (False, f"process exited with code {procs[r].exitcode}")
                continue
            out[rank] = (ok, value)
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
        parts = [f"rank {r} did not finish within {timeout:.0f} s" for r in missing]
        parts += [f"rank {r} failed:\n{tb}" for r, tb in sorted(failed.items())]
        raise DistributedRunError("\n".join(parts))
    return [out[r][1] for r in range(world_size)]
