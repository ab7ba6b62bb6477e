"""Benchmark: the cost of one message, our transport vs plain gloo calls, and of a sleep.

Run ``python benchmarks/bench_transport.py`` (``--help`` for the options). Two fresh
processes joined by gloo on 127.0.0.1 (:mod:`bench_launch`) play ping-pong with one
small tensor, ``--rounds`` times after a warm-up, in three ways, side by side in one
run:

* ``gloo``: the process group's own ``send``/``recv`` and ``wait()`` in the calling
  thread, nothing else (the floor for any runtime on gloo);
* ``ours``: :class:`dualpipe.transport.Transport` as a step uses it (tags, the
  record kept for draining, completion learned by the thread that needs the message,
  sends collected once a later message from the peer arrived);

and prints per round trip: the wall time, the CPU of the calling thread and the CPU
of every other thread of the process (gloo's socket loop, ours if any), from
``/proc/self/task``.

It also measures what a ``time.sleep(10 ms)`` costs on this machine: its overshoot
and the CPU time the sleeping thread is charged (on some virtual machines a timer
wake-up is not free), which bounds how closely sleep stages can follow the
simulator.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Sequence
from typing import Any

import bench_launch
import torch
import torch.distributed as dist
from bench_pipelines import run_header

MODES = ("gloo", "ours")


def _other_threads_cpu() -> float:
    """CPU seconds of every thread of this process but the calling one."""
    me = threading.get_native_id()
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:  # the thread ended
            continue
    return total / 1e9


def pingpong_worker(rank: int, world: int, mode: str, rounds: int, warmup: int,
                    numel: int) -> dict[str, float]:
    """One side of the ping-pong (rank 0 sends first); returns per-round-trip figures."""
    from datetime import timedelta

    from dualpipe.transport.process_group import Transport

    del world
    torch.set_num_threads(1)
    peer = 1 - rank
    out, buf = torch.ones(numel), torch.zeros(numel)
    transport = Transport(None, [0, 1], rank, torch.device("cpu"), timeout=60.0)
    group = dist.distributed_c10d._get_default_group()
    limit = timedelta(seconds=60)

    def one(i: int) -> None:
        seq = i % 1000
        if mode == "gloo":
            if rank == 0:
                sent = group.send([out], peer, seq)
                got = group.recv([buf], peer, seq)
                got.wait(limit)
                sent.wait(limit)
            else:
                got = group.recv([buf], peer, seq)
                got.wait(limit)
                group.send([out], peer, seq).wait(limit)
            return
        if rank == 0:
            transport.send([out], peer, seq)
            transport.wait(transport.recv([buf], peer, seq), "pong")
        else:
            transport.wait(transport.recv([buf], peer, seq), "ping")
            transport.send([out], peer, seq)
        if seq == 999:  # a step ends: sends completed, the step's record dropped
            transport.drain_sends("sends")
            transport.begin_step(i // 1000 + 1)

    for i in range(warmup):
        one(i)
    transport.drain_sends("sends")
    transport.begin_step(0)
    dist.barrier()
    cpu0, others0, t0 = time.thread_time(), _other_threads_cpu(), time.perf_counter()
    for i in range(rounds):
        one(i)
    wall = time.perf_counter() - t0
    cpu, others = time.thread_time() - cpu0, _other_threads_cpu() - others0
    transport.drain_sends("sends")
    dist.barrier()
    transport.close()
    return {"wall_us": wall / rounds * 1e6, "cpu_us": cpu / rounds * 1e6,
            "others_us": others / rounds * 1e6}


def sleep_cost(ms: float, count: int) -> tuple[float, float]:
    """(median overshoot in ms, CPU ms charged per sleep) of ``count`` sleeps of ``ms``."""
    over = []
    cpu0 = time.thread_time()
    for _ in range(count):
        t0 = time.perf_counter()
        time.sleep(ms / 1000.0)
        over.append((time.perf_counter() - t0) * 1000.0 - ms)
    return statistics.median(over), (time.thread_time() - cpu0) * 1000.0 / count


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3000, help="timed round trips (default 3000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed round trips first")
    p.add_argument("--numel", type=int, default=16, help="fp32 elements per message (16)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of each mode, interleaved (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table."""
    args = build_parser().parse_args(argv)
    print("\n".join(run_header("bench_transport.py", argv)))
    print(f"{args.numel * 4} B messages, {args.rounds} round trips per run")
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.repeat):
        for mode in MODES:
            try:
                result: list[Any] = bench_launch.launch(
                    pingpong_worker, 2, mode, args.rounds, args.warmup, args.numel,
                    timeout=args.timeout)
            except Exception as exc:  # noqa: BLE001 - reported as an error row
                print(f"{mode}: error: {type(exc).__name__}: {str(exc).splitlines()[0]}")
                continue
            rows[mode].append(result[0])
    print()
    print(f"{'mode':<6} {'runs':>4} {'round trip us':>14} {'caller cpu us':>14} "
          f"{'other threads cpu us':>21}")
    for mode in MODES:
        runs = rows[mode]
        if not runs:
            continue
        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)
        print(f"{mode:<6} {len(runs):>4} {med('wall_us'):>14.1f} {med('cpu_us'):>14.1f} "
              f"{med('others_us'):>21.1f}")
    over, cpu = sleep_cost(10.0, 50)
    print(f"\ntime.sleep(10 ms), 50 times in this process: median overshoot {over:.3f} ms, "
          f"{cpu:.3f} ms CPU charged per sleep")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
