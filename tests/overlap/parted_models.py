"""A small mixture-of-experts stage written as parts, and its one-process reference."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dualpipe.overlap import AllToAll, PartedStage

DIM = 8


class Expert(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class MoEStage(PartedStage):
    """Attention-like mixing, top-2 routing over ``ep * local`` experts (rank ``q`` of the
    expert-parallel group holds experts ``q*local .. q*local+local-1``; every rank builds
    all of them, same seed, and uses its own), dispatch and combine all-to-alls.

    ``ckpt``: None, "nonreentrant" or "reentrant" activation checkpointing of the
    attention and of every expert."""

    def __init__(self, group: object = None, ep: int = 2, local: int = 2, d: int = DIM,
                 ckpt: str | None = None) -> None:
        super().__init__()
        self.ep, self.local, self.ckpt = ep, local, ckpt
        self.mix = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.gate = nn.Linear(d, ep * local)
        self.experts = nn.ModuleList(Expert(d) for _ in range(ep * local))
        self.a2a = AllToAll(group)  # type: ignore[arg-type]

    def _run(self, fn: nn.Module, x: Tensor) -> Tensor:
        if self.ckpt is None:
            return fn(x)
        return checkpoint(fn, x, use_reentrant=self.ckpt == "reentrant")

    def _front(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Residual, rows to send (sorted by expert), their order, gate weights, counts."""
        h = x + torch.tanh(self._run(self.mix, x))
        z = self.norm(h)
        probs = torch.softmax(self.gate(z), dim=-1)
        weight, expert = probs.topk(2, dim=-1)  # [T, 2]
        flat = expert.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = z.repeat_interleave(2, dim=0)[order]
        counts = torch.bincount(flat, minlength=self.ep * self.local)
        return h, rows, order, weight, counts

    def _experts(self, rows: Tensor, counts: list[int], experts: list[int]) -> Tensor:
        outs, at = [], 0
        for e, c in zip(experts, counts, strict=True):
            outs.append(self._run(self.experts[e], rows[at:at + c]))
            at += c
        return torch.cat(outs)

    @staticmethod
    def _back(h: Tensor, y: Tensor, order: Tensor, weight: Tensor) -> Tensor:
        unsorted = torch.empty_like(y).index_copy(0, order, y)
        return h + (unsorted.view(h.shape[0], 2, -1) * weight.unsqueeze(-1)).sum(1)

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        h, rows, order, weight, counts = self._front(x)
        # how many rows each rank sends me, per expert of mine
        recv_counts, h, rows, order, weight, counts = yield (
            self.a2a(counts), h, rows, order, weight, counts)
        send = counts.view(self.ep, self.local).sum(1).tolist()
        got = recv_counts.view(self.ep, self.local)
        recv = got.sum(1).tolist()
        recv_rows, h, order, weight = yield (
            self.a2a(rows, in_splits=send, out_splits=recv), h, order, weight)
        me = torch.distributed.get_rank(self.a2a.group)  # type: ignore[arg-type]
        mine = list(range(me * self.local, (me + 1) * self.local))
        outs, at = [], 0
        for src in range(self.ep):
            n = recv[src]
            outs.append(self._experts(recv_rows[at:at + n], got[src].tolist(), mine))
            at += n
        y, h, order, weight = yield (
            self.a2a(torch.cat(outs), in_splits=recv, out_splits=send), h, order, weight)
        return self._back(h, y, order, weight)

    def local_forward(self, x: Tensor) -> Tensor:
        """The same layer with every expert local and no communication (the reference)."""
        h, rows, order, weight, counts = self._front(x)
        per = counts.tolist()
        outs, at = [], 0
        for q in range(self.ep):
            experts = list(range(q * self.local, (q + 1) * self.local))
            n = sum(per[e] for e in experts)
            outs.append(self._experts(rows[at:at + n], [per[e] for e in experts], experts))
            at += n
        return self._back(h, torch.cat(outs), order, weight)


def expert_owner(name: str, local: int) -> int | None:
    """The expert-parallel rank whose expert a parameter name belongs to (None: shared)."""
    if not name.startswith("experts."):
        return None
    return int(name.split(".")[1]) // local
