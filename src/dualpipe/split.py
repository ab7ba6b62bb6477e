"""Cut a model (a list of layers) into the stages a schedule needs, balanced by parameter
count or by per-layer times, and return the modules one pipeline rank passes to the pipeline.

Each stage is a :class:`StageModule`: an ``nn.Sequential`` whose children keep their global
layer index as their name, so a stage's ``state_dict`` keys (``"5.attn.weight"``) do not
depend on how the model was cut (:mod:`dualpipe.checkpoint` relies on this).
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .schedules.layout import Layout
from .schedules.registry import layout_for
from .schedules.schedule import Schedule

__all__ = [
    "StageModule",
    "partition",
    "param_counts",
    "measure_layer_times",
    "split_stages",
    "split_model",
    "pipeline_position",
]


class StageModule(nn.Sequential):
    """One pipeline stage: consecutive layers of a model, run in order.

    Children are named by their index in the whole model (``self[0]`` is layer
    ``layer_ids[0]``). A layer returning a tuple passes it unpacked to the next layer;
    the stage returns what its last layer returns.

    Attributes:
        stage: the global stage index ``k`` of ``S_k``.
        layer_ids: the model's layer indices held here.
    """

    def __init__(self, stage: int, layers: Sequence[tuple[int, nn.Module]]) -> None:
        super().__init__(OrderedDict((str(i), layer) for i, layer in layers))
        self.stage = stage
        self.layer_ids = tuple(i for i, _ in layers)

    def forward(self, *inputs: Any) -> Any:
        x: Any = inputs if len(inputs) != 1 else inputs[0]
        for layer in self:
            x = layer(*x) if isinstance(x, tuple) else layer(x)
        return x

    def extra_repr(self) -> str:
        return f"stage={self.stage}, layers={list(self.layer_ids)}"


def param_counts(layers: Sequence[nn.Module]) -> list[float]:
    """Number of parameter elements of each layer (a parameter shared by two layers, such
    as a tied embedding and output head, counts in both)."""
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def measure_layer_times(
    layers: Sequence[nn.Module], *example_inputs: torch.Tensor, repeats: int = 3
) -> list[float]:
    """Median forward + backward time of each layer in milliseconds, measured by running
    ``example_inputs`` (one micro-batch) through the layers in order on this process.

    Parameter gradients are left as they were. Use the result as ``costs`` of
    :func:`split_model` (every rank must pass the same costs: measure on one rank and
    broadcast, or measure once and store them)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    saved = {p: p.grad for layer in layers for p in layer.parameters()}
    for p in saved:
        p.grad = None
    times: list[float] = []
    x: Any = example_inputs if len(example_inputs) != 1 else example_inputs[0]
    try:
        for layer in layers:
            samples = []
            for _ in range(repeats):
                args = _leaves(x)
                _synchronize(args)
                t0 = time.perf_counter()
                out = layer(*args) if isinstance(args, tuple) else layer(args)
                roots = [t for t in _tensors(out) if t.requires_grad]
                if roots:
                    torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
                _synchronize(out)
                samples.append((time.perf_counter() - t0) * 1000.0)
            times.append(statistics.median(samples))
            x = _detached(out)
    finally:
        for p, g in saved.items():
            p.grad = g
    return times


def _synchronize(x: Any) -> None:
    """Wait for queued GPU work (kernels run asynchronously) before reading the clock."""
    for t in _tensors(x):
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
            return


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for t in x if isinstance(t, torch.Tensor)] if isinstance(x, tuple) else []


def _leaves(x: Any) -> Any:
    def leaf(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().requires_grad_()
        return t

    return tuple(leaf(t) for t in x) if isinstance(x, tuple) else leaf(x)


def _detached(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in x)
    return x.detach() if isinstance(x, torch.Tensor) else x


def partition(costs: Sequence[float], num_stages: int) -> list[range]:
    """Cut layers with ``costs`` into ``num_stages`` consecutive, non-empty ranges whose
    largest total cost is as small as possible (exact); among such cuts, the most even one
    (smallest sum of squared stage costs)."""
    n = len(costs)
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if n < num_stages:
        raise ValueError(f"cannot cut {n} layers into {num_stages} non-empty stages")
    if any(c < 0 for c in costs):
        raise ValueError("layer costs must be >= 0")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    worst = _smallest_max(prefix, num_stages)
    # among the cuts whose largest stage costs ``worst``, take the one with the smallest
    # sum of squared stage costs (the most even): sq[j][i] for layers[:i] in j stages
    inf = float("inf")
    sq = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    sq[0][0] = 0.0
    for j in range(1, num_stages + 1):
        prev = sq[j - 1]
        for i in range(j, n - (num_stages - j) + 1):
            first = bisect.bisect_left(prefix, prefix[i] - worst, 0, i)
            for m in range(max(first - 1, j - 1), i):
                stage = prefix[i] - prefix[m]
                if stage <= worst and prev[m] + stage * stage < sq[j][i]:
                    sq[j][i], cut[j][i] = prev[m] + stage * stage, m
    ranges: list[range] = []
    end = n
    for j in range(num_stages, 0, -1):
        start = cut[j][end]
        ranges.append(range(start, end))
        end = start
    return ranges[::-1]


def _smallest_max(prefix: list[float], num_stages: int) -> float:
    """The smallest possible largest stage cost (``prefix``: prefix sums of the costs)."""
    n = len(prefix) - 1
    # best[i]: smallest max-stage cost of layers[:i] in j stages (one row per j)
    inf = float("inf")
    best = [0.0] + [inf] * n
    for j in range(1, num_stages + 1):
        prev, best = best, [inf] * (n + 1)
        # the last stage of j stages covering layers[:i] starts at m in [j-1, i-1]; prev[m]
        # grows with m and the last stage's cost shrinks: bisect for where they cross
        for i in range(j, n - (num_stages - j) + 1):
            lo, hi = j - 1, i - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if prev[mid] >= prefix[i] - prefix[mid]:
                    hi = mid
                else:
                    lo = mid + 1
            value = max(prev[lo], prefix[i] - prefix[lo])
            if lo > j - 1:
                value = min(value, max(prev[lo - 1], prefix[i] - prefix[lo - 1]))
            best[i] = value
    return best[n]


def _costs(layers: Sequence[nn.Module], costs: str | Sequence[float]) -> list[float]:
    if isinstance(costs, str):
        if costs != "params":
            raise ValueError(f"costs must be 'params' or one number per layer, got {costs!r}")
        return param_counts(layers)
    values = [float(c) for c in costs]
    if len(values) != len(layers):
        raise ValueError(f"got {len(values)} costs for {len(layers)} layers")
    return values


def split_stages(
    layers: Sequence[nn.Module], num_stages: int, costs: str | Sequence[float] = "params"
) -> list[StageModule]:
    """All ``num_stages`` stages of the model, balanced by ``costs`` (``"params"``: parameter
    counts; or one number per layer, e.g. from :func:`measure_layer_times`)."""
    layers = list(layers)
    ranges = partition(_costs(layers, costs), num_stages)
    return [StageModule(k, [(i, layers[i]) for i in r]) for k, r in enumerate(ranges)]


def pipeline_position(
    schedule: str | Schedule | Layout,
    rank: int | None = None,
    num_ranks: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Layout, int]:
    """The layout of ``schedule`` (a name, a :class:`~dualpipe.schedules.Schedule` or a
    :class:`~dualpipe.schedules.layout.Layout`) and this process's pipeline rank in it:
    ``rank`` and ``num_ranks`` default to this process's rank in ``group`` and its size.

    Raises:
        ValueError: ``num_ranks`` is not the schedule's, or ``rank`` is outside it.
    """
    if isinstance(schedule, Schedule):
        layout = schedule.layout
    elif isinstance(schedule, Layout):
        layout = schedule
    else:
        if num_ranks is None:
            num_ranks = dist.get_world_size(group)
        layout = layout_for(schedule, num_ranks)
    if num_ranks is not None and num_ranks != layout.num_ranks:
        raise ValueError(f"the schedule is for {layout.num_ranks} ranks, not {num_ranks}")
    if rank is None:
        rank = dist.get_rank(group)
    if not 0 <= rank < layout.num_ranks:
        raise ValueError(f"rank {rank} is outside a pipeline of {layout.num_ranks} ranks")
    return layout, rank


def split_model(
    layers: Sequence[nn.Module],
    schedule: str | Schedule | Layout = "dualpipev",
    *,
    costs: str | Sequence[float] = "params",
    rank: int | None = None,
    num_ranks: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> list[StageModule]:
    """This pipeline rank's stage modules, in the order the pipeline expects them.

    The layers (an ``nn.Sequential`` or any list of modules, applied in order) are cut into
    the schedule's stages (DualPipeV and ZBV on N ranks: 2N; DualPipe: N; 1F1B, ZB1P,
    GPipe: N; any registered schedule: its layout's) with the largest stage as small as
    possible under ``costs``, and the stages of ``layout.rank_stages[rank]`` are returned
    (DualPipeV: ``(S_r, S_{2N-1-r})``; DualPipe: ``(S_r, S_{N-1-r})``), ready for
    ``Pipeline(split_model(...), schedule)``.

    Every rank must pass the same layers and costs (build the model from one seed). Layers
    that are not this rank's are not touched; drop them to free their memory.

    Tied weights: a parameter shared by two layers stays shared when both land on one rank.
    DualPipeV puts the first and the last stage on rank 0 (DualPipe on ranks 0 and N-1,
    each holding both), so an embedding tied to the output head just works there (autograd
    sums both uses; DualPipe's mirrored gradient sum counts the shared parameter once).
    With single-direction schedules the two uses land on different ranks and the tie must
    be kept by hand (sum the two gradients between the ranks).

    Args:
        layers: the model as consecutive layers.
        schedule: a schedule name, a :class:`~dualpipe.schedules.Schedule` or a
            :class:`~dualpipe.schedules.layout.Layout`.
        costs: ``"params"`` (balance parameter counts) or one cost per layer (for example
            :func:`measure_layer_times`).
        rank: pipeline rank (default: this process's rank in ``group``).
        num_ranks: pipeline size (default: the size of ``group``).
        group: the pipeline's process group (default: the world), used for the defaults.
    """
    layout, rank = pipeline_position(schedule, rank, num_ranks, group)
    stages = split_stages(layers, layout.num_stages, costs)
    return [stages[k] for k in layout.rank_stages[rank]]
