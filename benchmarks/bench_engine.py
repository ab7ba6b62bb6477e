"""Benchmark: the overlap engine's own CPU cost per pair, with nothing to wait for.

Run ``python benchmarks/bench_engine.py``. One process, no communication: a stage of
three computation parts (small linear layers) separated by two communication parts
whose work is already complete when launched (a copy), so what is timed is the engine's
bookkeeping — part records, launches, waits that find the work done, the input-only
backward per part and its weight work — plus the tiny layers themselves. Each kind of
pair is timed against its two halves run one after the other, same tasks; the difference
is what interleaving costs beyond running the parts at all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dualpipe.overlap import AsyncComm, InFlight, PartedStage, Waiter
from dualpipe.overlap.engine import BackwardTask, ForwardTask, Task, run_interleaved


class _Done:
    """A completed handle (its future too)."""

    def is_completed(self) -> bool:
        return True

    def wait(self) -> bool:
        return True

    def get_future(self) -> _Done:
        return self

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)


class Copy(AsyncComm):
    """A communication part that completes at once (a copy)."""

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        out = inputs[0].clone()
        return InFlight([_Done()], lambda: (out,))

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        out = grads[0].clone()
        return InFlight([_Done()], lambda: (out,))


class Stage(PartedStage):
    """Three linear parts, two communications."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.comm = Copy()

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        y = yield self.comm(self.a(x))
        z = yield self.comm(self.b(y))
        return self.c(z)


def _tasks(stage: Stage, x: Tensor, kind: str) -> list[Task]:
    """The two tasks of a pair of ``kind``, in the engine's order (a backward first)."""
    waiter = Waiter(60.0)

    def backward() -> BackwardTask:
        record = ForwardTask(stage, (x,), waiter)
        record.finish()
        out = record.outputs
        return BackwardTask(record, [out], [torch.ones_like(out)], waiter, split=True)

    if kind == "FB":
        return [backward(), ForwardTask(stage, (x,), waiter)]
    if kind == "FF":
        return [ForwardTask(stage, (x,), waiter), ForwardTask(stage, (x,), waiter)]
    return [backward(), backward()]


def _run(tasks: Sequence[Task], interleaved: bool) -> None:
    if interleaved:
        run_interleaved(tasks)
    else:
        for task in tasks:
            task.finish()
    for task in tasks:
        if isinstance(task, BackwardTask):
            task.weight.run()


def measure(kind: str, interleaved: bool, dim: int, reps: int) -> float:
    """Median CPU ms of one pair's run (the records its backwards need excluded)."""
    stage = Stage(dim)
    x = torch.randn(8, dim, requires_grad=True)
    times = []
    for i in range(reps + 20):
        tasks = _tasks(stage, x, kind)
        t0 = time.process_time()
        _run(tasks, interleaved)
        if i >= 20:
            times.append(time.process_time() - t0)
    return statistics.median(times) * 1000.0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=64, help="width of the linear layers (64)")
    p.add_argument("--reps", type=int, default=300, help="timed pairs per row (300)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"one process, three parts of Linear({args.dim}, {args.dim}) on 8 rows, two "
          "communications already complete; CPU ms per pair (median)")
    print(f"  {'pair':<6} {'interleaved':>12} {'one after the other':>20} {'difference':>11}")
    for kind in ("FB", "FF", "BB"):
        inter = measure(kind, True, args.dim, args.reps)
        apart = measure(kind, False, args.dim, args.reps)
        print(f"  {kind:<6} {inter:12.3f} {apart:20.3f} {inter - apart:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
