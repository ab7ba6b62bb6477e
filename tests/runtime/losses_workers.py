"""Spawned-rank functions for tests/runtime/test_losses.py: the step's token mean with
padded labels, against one process computing the token mean of the whole batch."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualpipe.data_parallel import GradientSync
from dualpipe.runtime.pipeline import Pipeline
from dualpipe.schedules.registry import layout_for

DIM, VOCAB, SEQ = 8, 11, 5


class Block(nn.Module):
    def __init__(self, last: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, VOCAB if last else DIM)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y if self.last else torch.tanh(y)


def _stages(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Block(k == n - 1) for k in range(n)]


def _batch(replica: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + replica)
    x = torch.randn(rows, SEQ, DIM, generator=g)
    y = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    # padding of uneven length: every row keeps a different number of labels
    for r in range(rows):
        y[r, (r * 3) % SEQ + (r % 2):] = -100
    return x, y


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum",
                           ignore_index=-100)


def token_mean(rank: int, world: int, schedule: str, dp: int) -> list[float]:
    """One step with ``loss_reduction="token_mean"`` on ``world // dp`` pipeline ranks and
    ``dp`` replicas (summed by GradientSync); returns per stage the relative gradient
    error against one process (token mean of every replica's whole padded batch) and,
    where a stream ends, the loss error."""
    pp_size = world // dp
    replica, pp_rank = rank // pp_size, rank % pp_size
    pp_groups = [dist.new_group(list(range(r * pp_size, (r + 1) * pp_size)))
                 for r in range(dp)]
    dp_groups = [dist.new_group(list(range(p, world, pp_size))) for p in range(pp_size)]
    layout = layout_for(schedule, pp_size)
    stages = _stages(layout.num_stages)
    mine = [copy.deepcopy(stages[k]) for k in layout.rank_stages[pp_rank]]
    pipe = Pipeline(mine, schedule, process_group=pp_groups[replica], timeout=60,
                    loss_reduction="token_mean",
                    data_group=dp_groups[pp_rank] if dp > 1 else None)
    sync = GradientSync(pipe, average=False) if dp > 1 else None
    chunks = 4
    x, y = _batch(replica, 2 * chunks)
    streams = layout.num_streams
    xs, ys = x.chunk(streams), y.chunk(streams)
    start = layout.streams_starting_on(pp_rank)
    end = layout.streams_ending_on(pp_rank)
    losses, _ = pipe.step(*((xs[start[0]],) if start else ()), num_chunks=chunks,
                          criterion=_sum_ce, labels=(ys[end[0]],) if end else ())
    if sync is not None:
        sync()
    # one process: the token mean of every replica's whole batch
    ref = _stages(layout.num_stages)
    logits, labels = [], []
    for r in range(dp):
        xr, yr = _batch(r, 2 * chunks)
        h = xr
        for stream in range(streams):
            part = xr.chunk(streams)[stream]
            for k in layout.stages[stream]:
                part = ref[k](part)
            logits.append(part)
            labels.append(yr.chunk(streams)[stream])
        del h
    loss = F.cross_entropy(torch.cat(logits).reshape(-1, VOCAB), torch.cat(labels).reshape(-1),
                           ignore_index=-100)
    loss.backward()
    out = []
    for k, module in zip(layout.rank_stages[pp_rank], mine, strict=True):
        for p, q in zip(module.parameters(), ref[k].parameters(), strict=True):
            assert p.grad is not None
            out.append(float((p.grad - q.grad).norm() / q.grad.norm()))
    if end:
        assert losses is not None and pipe.last_token_count is not None
        valid = int(sum((lab != -100).sum() for lab in labels))
        assert pipe.last_token_count == valid, (pipe.last_token_count, valid)
    if schedule == "dualpipe":  # the two ends swap counts: the store keeps only the last
        pipe.step(*((xs[start[0]],) if start else ()), num_chunks=chunks,
                  criterion=_sum_ce, labels=(ys[end[0]],) if end else ())
        assert pipe.transport._read(f"tokens/1/{pp_rank}") is None
        assert pipe.transport._read(f"tokens/2/{pp_rank}") is not None
    pipe.close()
    return out
