"""Stage modules for the pipeline benchmarks.

:class:`SleepStage` stands in for a model stage whose costs are known exactly:
its forward sleeps ``F`` ms and its backward consists of two *independent*
autograd branches,

* the input branch (:class:`_InputBranch`), which produces the gradient of the
  stage input and sleeps ``B`` ms, and
* the weight branch (:class:`_WeightBranch`), which produces the gradient of the
  stage's one parameter and sleeps ``W`` ms.

Both branches meet only in a free :class:`_Join` node right at the output, so an
automatic input/weight split of the backward (ours, torch.distributed.pipelining's)
can run the input branch alone in an input-only backward and the weight branch
alone in the deferred weight pass. ``time.sleep`` releases the CPU, so many ranks
"compute" in parallel on a 2-core machine and only the runtimes' own work
competes for the cores.

The tensors carry no meaningful values (``torch.empty_like``): sleep stages
measure scheduling and communication, and only the bytes moved between ranks
matter. Every branch call is counted in :data:`COUNTS` so the benchmark can check
which parts of the backward each runtime action really ran.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.autograd import Function

__all__ = [
    "COUNTS",
    "SleepStage",
    "build_sleep_stages",
    "reset_counts",
    "sleep_loss",
    "sleep_ms",
]

COUNTS: dict[str, int] = {"forward": 0, "input": 0, "weight": 0}
"""Calls of the forward, the input-gradient branch and the weight-gradient branch
in this process since the last :func:`reset_counts`."""

SLEPT: list[float] = [0, 0.0]
"""Sleeps since the last :func:`reset_counts` and their total overshoot in ms (how much
longer than asked they took: timer slack and waiting for a free core)."""


def reset_counts() -> None:
    """Zero :data:`COUNTS` and :data:`SLEPT`."""
    for key in COUNTS:
        COUNTS[key] = 0
    SLEPT[0], SLEPT[1] = 0, 0.0


def sleep_ms(ms: float) -> None:
    """Sleep ``ms`` milliseconds (nothing at all for 0, so zero-cost stages are free)."""
    if ms > 0:
        t0 = time.perf_counter()
        time.sleep(ms / 1000.0)
        SLEPT[0] += 1
        SLEPT[1] += (time.perf_counter() - t0) * 1000.0 - ms


class _InputBranch(Function):
    """``y = x`` in shape only; backward sleeps ``B`` ms and yields the input gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b_ms: float) -> torch.Tensor:
        ctx.b_ms = b_ms
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        COUNTS["input"] += 1
        sleep_ms(ctx.b_ms)
        return torch.empty_like(grad), None


class _WeightBranch(Function):
    """A function of the weight alone; backward sleeps ``W`` ms and yields its gradient."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, w_ms: float) -> torch.Tensor:
        ctx.w_ms = w_ms
        return weight.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        COUNTS["weight"] += 1
        sleep_ms(ctx.w_ms)
        return torch.zeros_like(grad), None


class _Join(Function):
    """Joins the two branches into the stage output at no cost (no data is touched)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.w_shape = w.shape
        return torch.empty_like(a)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad.new_zeros(ctx.w_shape)


class _CheapLoss(Function):
    """A scalar "loss" of an output whose gradient costs one allocation."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor) -> torch.Tensor:
        ctx.shape = out.shape
        return out.new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.new_empty(ctx.shape)


def sleep_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Criterion for sleep stages: a scalar depending on ``out`` at (almost) no cost."""
    del target
    return _CheapLoss.apply(out)


class SleepStage(nn.Module):
    """A pipeline stage with exact, sleeping costs.

    Args:
        f_ms: forward time.
        b_ms: input-gradient branch time (the ``B`` of an input-only backward).
        w_ms: weight-gradient branch time (the ``W`` action).
    """

    def __init__(self, f_ms: float, b_ms: float, w_ms: float) -> None:
        super().__init__()
        self.f_ms, self.b_ms, self.w_ms = f_ms, b_ms, w_ms
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sleep ``F`` ms; the output has the shape and dtype of ``x``."""
        COUNTS["forward"] += 1
        sleep_ms(self.f_ms)
        return _Join.apply(_InputBranch.apply(x, self.b_ms), _WeightBranch.apply(self.weight,
                                                                                 self.w_ms))

    def extra_repr(self) -> str:
        """Show the costs in ``print(module)``."""
        return f"F={self.f_ms} ms, B={self.b_ms} ms, W={self.w_ms} ms"


def build_sleep_stages(num_stages: int, f_ms: float, b_ms: float, w_ms: float) -> list[SleepStage]:
    """The ``num_stages`` stages of a sleep model (weights all zero, so copies match).

    Stage 0 reads the pipeline input, which needs no gradient (it is data), so its
    input branch never runs. To keep every stage's full backward at ``B + W`` and
    every rank's compute equal to the uniform cost model of the simulator, stage 0's
    weight branch sleeps ``B + W``. Runtimes (ours and torch's) run nothing for an
    input-only backward of stage 0 and all of it in its weight pass; in our
    simulator this moves stage 0's ``B`` from its ``I`` to its ``W``, which leaves
    the simulated makespans of these schedules unchanged.
    """
    stages = [SleepStage(f_ms, b_ms, w_ms) for _ in range(num_stages)]
    if stages:
        stages[0] = SleepStage(f_ms, b_ms, b_ms + w_ms)
    return stages
