"""The MoE demo's training run of one process: 2 pipeline ranks x 2 expert-parallel
ranks laid out with a DeviceMesh, DualPipeV with the overlap engine, first-step
gradient check against one process, and the measured parts of a recorded step."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..partcosts import PartInterval
from ..runtime.pipeline import Pipeline
from ..schedules.actions import Overlap
from ..schedules.registry import layout_for
from .moe import MoEConfig, MoEStage, expert_owner, moe_stages, to_intervals
from .task import CopyTask, lm_loss
from .train import GRAD_ATOL, GRAD_RTOL, GradCheck, model_config

__all__ = ["MoEOptions", "MoERankResult", "moe_config", "train_moe_rank", "PIPELINE_RANKS",
           "measure_pair"]

PIPELINE_RANKS = 2
"""The mesh is ``PIPELINE_RANKS`` x (processes / ``PIPELINE_RANKS``) expert-parallel."""


@dataclass(frozen=True)
class MoEOptions:
    """The MoE run (picklable): DualPipeV, ``chunks`` micro-batches of ``micro_batch``
    sequences per expert-parallel rank, ``steps`` AdamW steps."""

    chunks: int = 8
    steps: int = 60
    micro_batch: int = 8
    seed: int = 0
    lr: float = 3e-3
    timeout: float = 60.0


@dataclass
class MoERankResult:
    """What a process returns (the reporting process, mesh rank 0, fills it all)."""

    rank: int
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    grad_check: GradCheck | None = None
    pair: list[PartInterval] = field(default_factory=list)
    comm_ms: float = 0.0  # recorded step: time with an all-to-all in flight (union)
    waited_ms: float = 0.0  # of which blocked waiting for one
    pairs_interleaved: int = 0
    plain_ms: list[float] = field(default_factory=list)  # steps with the overlap engine off
    check_detail: str = ""  # the gradient check's figures, when not the default wording


def moe_config(ep: int) -> MoEConfig:
    """The demo's MoE model: the dense demo GPT's shape, 4 experts, top-2."""
    return MoEConfig(model_config(2 * PIPELINE_RANKS), num_experts=4, top_k=2, ep=ep)


def _reference(stages: list[MoEStage], shards: list[tuple[torch.Tensor, torch.Tensor]],
               chunks: int, layout_stages: tuple[int, ...]) -> tuple[list[MoEStage], list]:
    """Every micro-batch of ``shards`` through the stages on this process (all experts
    local), each loss backpropagated; the stages and per-shard stacked losses."""
    ref = copy.deepcopy(stages)
    losses = []
    for tokens, targets in shards:
        per = []
        for x, y in zip(tokens.tensor_split(chunks), targets.tensor_split(chunks), strict=True):
            for k in layout_stages:
                x = ref[k].local_forward(x)
            loss = lm_loss(x, y)
            loss.backward()
            per.append(loss.detach())
        losses.append(torch.stack(per))
    return ref, losses


def _check(mine: list[tuple[int, nn.Module]], own: list[MoEStage], every: list[MoEStage],
           config: MoEConfig, ep_rank: int, loss: torch.Tensor | None,
           ref_loss: torch.Tensor | None) -> GradCheck:
    """Shared parameters against this shard's reference, this rank's experts against
    every shard's (their tokens came through the all-to-all), losses bit-equal."""
    messages, worst = [], 0.0
    for k, module in mine:
        own_p, every_p = dict(own[k].named_parameters()), dict(every[k].named_parameters())
        for name, p in module.named_parameters():
            owner = expert_owner(name, config)
            if owner is not None and owner != ep_rank:
                if p.grad is not None and p.grad.any():
                    messages.append(f"stage {k} {name}: gradient on a rank without the expert")
                continue
            want = (own_p if owner is None else every_p)[name].grad
            if p.grad is None or want is None:
                if (p.grad is None) != (want is None):
                    messages.append(f"stage {k} {name}: missing gradient")
                continue
            worst = max(worst, float((p.grad - want).abs().max()))
            try:
                torch.testing.assert_close(p.grad, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)
            except AssertionError as exc:
                messages.append(f"stage {k} {name}: {str(exc).splitlines()[0]}")
    equal = True
    if ref_loss is not None:
        equal = loss is not None and torch.equal(loss, ref_loss)
        if not equal:
            messages.append(f"losses differ: pipeline {loss} vs single process {ref_loss}")
    return GradCheck(not messages, worst, equal, messages)


def train_moe_rank(rank: int, world: int, opts: MoEOptions) -> MoERankResult:
    """Train the MoE GPT as process ``rank`` of a ``PIPELINE_RANKS x EP`` mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    ep_size = world // PIPELINE_RANKS
    mesh = init_device_mesh("cpu", (PIPELINE_RANKS, ep_size), mesh_dim_names=("pp", "ep"))
    pp, ep = mesh.get_group("pp"), mesh.get_group("ep")
    pp_rank, ep_rank = rank // ep_size, rank % ep_size
    layout = layout_for("dualpipev", PIPELINE_RANKS)
    config = moe_config(ep_size)
    task = CopyTask(vocab_size=config.gpt.vocab_size)
    stages = moe_stages(config, layout.num_stages, ep, seed=opts.seed)
    pristine = copy.deepcopy(stages)
    ids = layout.rank_stages[pp_rank]
    mine = [stages[k] for k in ids]
    pipe = Pipeline(mine, "dualpipev", process_group=pp, timeout=opts.timeout)
    shared = [p for m in mine for n, p in m.named_parameters() if expert_owner(n, config) is None]
    experts = [p for m in mine for n, p in m.named_parameters()
               if expert_owner(n, config) == ep_rank]
    optimizer = torch.optim.AdamW(shared + experts, lr=opts.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    result = MoERankResult(rank)
    first = pp_rank == layout.paths[0][0][0]
    size = opts.chunks * opts.micro_batch

    def shard(r: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return task.batch(size, opts.seed * 1000 + r, step)

    for step in range(opts.steps):
        tokens, targets = shard(ep_rank, step)
        optimizer.zero_grad(set_to_none=True)
        record = step == opts.steps - 1
        dist.barrier()
        t0 = time.perf_counter()
        loss, _ = pipe.step(*((tokens,) if first else ()), num_chunks=opts.chunks,
                            criterion=lm_loss, labels=(targets,) if first else (),
                            record=record)
        step_s = time.perf_counter() - t0
        if step == 0:
            path = layout.stages[0]
            own, own_losses = _reference(pristine, [shard(ep_rank, 0)], opts.chunks, path)
            every, _ = _reference(pristine, [shard(r, 0) for r in range(ep_size)],
                                  opts.chunks, path)
            check = _check(list(zip(ids, mine, strict=True)), own, every, config, ep_rank,
                           loss, own_losses[0] if first else None)
            checks: list[GradCheck | None] = [None] * world
            dist.all_gather_object(checks, check)
            if rank == 0:
                result.grad_check = GradCheck.combine(checks)
        # the expert-parallel ranks are data-parallel for everything but the experts
        for p in shared:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ep)
        optimizer.step()
        stats = torch.tensor([float(loss.mean()) if loss is not None else 0.0,
                              1.0 if loss is not None else 0.0, step_s], dtype=torch.float64)
        everyone = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
        dist.all_gather(everyone, stats)
        table = torch.stack(everyone)
        if rank == 0:
            result.losses.append(float(table[:, 0].sum() / table[:, 1].sum()))
            result.step_ms.append(float(table[:, 2].max()) * 1e3)
        if record and rank == 0:
            measure_pair(pipe, result)
    return result


def measure_pair(pipe: Pipeline, result: MoERankResult) -> None:
    """Communication in flight and waited for over the recorded step, and the parts of
    its longest interleaved pair."""
    rec = pipe.last_record
    if rec is None:
        return
    parts = rec.parts
    result.comm_ms = union_length([(e.start, e.end) for e in parts if e.kind == "comm"]) * 1e3
    result.waited_ms = union_length([(e.start, e.end) for e in parts if e.kind == "wait"]) * 1e3
    pairs = [(t0, t1) for step, t0, t1 in rec.steps if isinstance(step, Overlap)]
    inside = [[e for e in parts if t0 <= e.start and e.end <= t1] for t0, t1 in pairs]
    interleaved = [(w, ev) for w, ev in zip(pairs, inside, strict=True)
                   if any(e.kind == "comm" for e in ev)]
    result.pairs_interleaved = len(interleaved)
    if interleaved:
        (t0, _), events = max(interleaved, key=lambda x: x[0][1] - x[0][0])
        result.pair = to_intervals(events, t0)


def union_length(spans: Sequence[tuple[float, float]]) -> float:
    """Total length of the union of ``spans``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total
