"""The demo's mixture-of-experts GPT: FFN layers are top-k routed experts sharded over
an expert-parallel group, each pipeline stage written as parts (dispatch and combine
all-to-alls between computation parts) so DualPipe's pairs overlap them."""

from __future__ import annotations

import copy
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..overlap import AllToAll, PartedStage, PartEvent
from ..partcosts import PartInterval
from .model import GPT, Block, GPTConfig, build_gpt, stage_sizes

__all__ = [
    "MoEConfig", "MoEFFN", "MoEBlock", "MoEStage", "moe_stages", "expert_owner", "to_intervals",
]


@dataclass(frozen=True)
class MoEConfig:
    """The MoE model: a :class:`GPTConfig` whose FFNs are ``num_experts`` experts, each
    token routed to ``top_k`` of them; ``ep`` ranks hold ``num_experts / ep`` each."""

    gpt: GPTConfig
    num_experts: int = 4
    top_k: int = 2
    ep: int = 2

    def __post_init__(self) -> None:
        if self.ep < 1 or self.num_experts % self.ep:
            raise ValueError(f"{self.num_experts} experts do not split over {self.ep} ranks")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")

    @property
    def local(self) -> int:
        """Experts per expert-parallel rank."""
        return self.num_experts // self.ep


class MoEFFN(nn.Module):
    """Router and experts of one layer. Rank ``q`` of ``group`` runs experts
    ``q*local .. (q+1)*local - 1``; every rank holds all of them (same weights from the
    same seed), so the one-process reference is the same module."""

    def __init__(self, config: MoEConfig, group: Any) -> None:
        super().__init__()
        dim, hidden = config.gpt.dim, config.gpt.mlp_ratio * config.gpt.dim
        self.config = config
        self.gate = nn.Linear(dim, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(config.num_experts)
        )
        self.a2a = AllToAll(group)


    def _route(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Rows to send sorted by expert, their order, gate weights, rows per expert."""
        k = self.config.top_k
        weight, expert = torch.softmax(self.gate(z), dim=-1).topk(k, dim=-1)
        flat = expert.reshape(-1)
        order = torch.argsort(flat, stable=True)
        rows = z.repeat_interleave(k, dim=0)[order]
        return rows, order, weight, torch.bincount(flat, minlength=self.config.num_experts)

    def _run_experts(self, rows: Tensor, counts: list[int], experts: Sequence[int]) -> Tensor:
        outs, at = [], 0
        for e, c in zip(experts, counts, strict=True):
            outs.append(self.experts[e](rows[at:at + c]))
            at += c
        return torch.cat(outs)

    def _combine(self, y: Tensor, order: Tensor, weight: Tensor) -> Tensor:
        unsorted = torch.empty_like(y).index_copy(0, order, y)
        return (unsorted.view(weight.shape[0], self.config.top_k, -1)
                * weight.unsqueeze(-1)).sum(1)

    def parts(self, z: Tensor, residual: Tensor) -> Generator[Any, Any, tuple[Tensor, Tensor]]:
        """``z [tokens, dim]`` through the experts; ``residual`` is carried along."""
        ep, local = self.config.ep, self.config.local
        rows, order, weight, counts = self._route(z)
        got, rows, order, weight, counts, residual = yield (
            self.a2a(counts), rows, order, weight, counts, residual)
        send = counts.view(ep, local).sum(1).tolist()
        per_src = got.view(ep, local)
        recv = per_src.sum(1).tolist()
        arrived, order, weight, residual = yield (
            self.a2a(rows, in_splits=send, out_splits=recv), order, weight, residual)
        me = dist.get_rank(self.a2a.group)
        mine = range(me * local, (me + 1) * local)
        outs, at = [], 0
        for src in range(ep):
            outs.append(self._run_experts(arrived[at:at + recv[src]], per_src[src].tolist(), mine))
            at += recv[src]
        back, order, weight, residual = yield (
            self.a2a(torch.cat(outs), in_splits=recv, out_splits=send), order, weight, residual)
        return self._combine(back, order, weight), residual

    def local_forward(self, z: Tensor) -> Tensor:
        """The same layer with every expert on this process (the one-process reference):
        each expert sees the same rows, in the same shapes, as on its owner rank."""
        rows, order, weight, counts = self._route(z)
        per = counts.tolist()
        outs, at = [], 0
        for q in range(self.config.ep):
            experts = range(q * self.config.local, (q + 1) * self.config.local)
            n = sum(per[e] for e in experts)
            outs.append(self._run_experts(rows[at:at + n], [per[e] for e in experts], experts))
            at += n
        return self._combine(torch.cat(outs), order, weight)


class MoEBlock(nn.Module):
    """A transformer block whose FFN is a :class:`MoEFFN`: attention computes while the
    other micro-batch's tokens travel, and the other way round."""

    def __init__(self, block: Block, config: MoEConfig, group: Any) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = block.ln1, block.attn, block.ln2
        self.ffn = MoEFFN(config, group)

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        x = x + self.attn(self.ln1(x))
        z = self.ln2(x).reshape(-1, x.shape[-1])
        y, x = yield from self.ffn.parts(z, x)
        return x + y.view_as(x)

    def local_forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn.local_forward(self.ln2(x).reshape(-1, x.shape[-1])).view_as(x)


class MoEStage(PartedStage):
    """A consecutive run of the MoE model's pieces (embedding, MoE blocks, head)."""

    def __init__(self, pieces: Sequence[nn.Module]) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(pieces)

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        for piece in self.pieces:
            if isinstance(piece, MoEBlock):
                x = yield from piece.parts(x)
            else:
                x = piece(x)
        return x

    def local_forward(self, x: Tensor) -> Tensor:
        """The stage on one process, every expert local (the reference)."""
        for piece in self.pieces:
            x = piece.local_forward(x) if isinstance(piece, MoEBlock) else piece(x)
        return x


def moe_stages(config: MoEConfig, num_stages: int, group: Any, seed: int = 0) -> list[MoEStage]:
    """The ``num_stages`` stages of the MoE model; same weights on every process for the
    same arguments (expert ``e`` starts as a copy of the dense MLP plus noise)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense: GPT = build_gpt(config.gpt, seed)
        pieces: list[nn.Module] = [dense.embed]
        for block in dense.blocks:
            assert isinstance(block, Block)
            moe = MoEBlock(block, config, group)
            for expert in moe.ffn.experts:
                expert.load_state_dict(copy.deepcopy(block.mlp.state_dict()))
                for p in expert.parameters():
                    p.data.add_(torch.randn_like(p) * 0.01)
            nn.init.normal_(moe.ffn.gate.weight, std=0.02)
            pieces.append(moe)
        pieces.append(dense.head)
    stages, start = [], 0
    for size in stage_sizes(len(pieces), num_stages):
        stages.append(MoEStage(pieces[start:start + size]))
        start += size
    return stages


def expert_owner(name: str, config: MoEConfig) -> int | None:
    """The expert-parallel rank running the expert a parameter belongs to (None: the
    parameter is shared by the expert-parallel group, like attention)."""
    parts = name.split(".")
    if "experts" not in parts:
        return None
    return int(parts[parts.index("experts") + 1]) // config.local



def to_intervals(events: Sequence[PartEvent], origin: float) -> list[PartInterval]:
    """Measured engine events as the pair picture's intervals (milliseconds from
    ``origin``): computation parts and weight work on the compute row, communications in
    flight (from launch until they completed) on the other."""
    out = []
    for e in events:
        words = e.label.split(" ")
        chain, k = words[0], words[-1]
        if e.kind == "compute":
            label, row = f"{chain}{k}", "compute"
        elif e.kind == "weight":
            label, row = "W", "compute"
        elif e.kind == "comm":
            label, row = f"{chain}{k}>", "comm"
        else:
            continue
        out.append(PartInterval(row, label, (e.start - origin) * 1e3, (e.end - origin) * 1e3))
    return out
