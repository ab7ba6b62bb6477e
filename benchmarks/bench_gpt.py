"""A small GPT-style model cut into pipeline stages, for the real-compute benchmark row.

``ids [B, T] -> embedding (+ positions) -> blocks -> LayerNorm -> head -> logits``.
:func:`gpt_stages` builds the stages deterministically from a seed, so every rank
(and both runtimes) gets bit-identical weights: stage 0 holds the embedding and the
first block(s), the last stage the last block(s) and the head, the rest blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTShape", "gpt_stages", "gpt_loss", "gpt_batch"]


@dataclass(frozen=True)
class GPTShape:
    """Model and batch shape.

    Attributes:
        vocab: token ids.
        seq: tokens per sequence.
        dim: residual width.
        heads: attention heads.
        layers: transformer blocks (spread evenly over the stages).
        mb: sequences per micro-batch.
    """

    vocab: int = 512
    seq: int = 64
    dim: int = 128
    heads: int = 4
    layers: int = 4
    mb: int = 4


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP, both residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _Stage(nn.Module):
    """Optional embedding, some blocks, optional final norm and head."""

    def __init__(self, shape: GPTShape, blocks: int, first: bool, last: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(shape.vocab, shape.dim) if first else None
        self.pos = nn.Parameter(torch.randn(shape.seq, shape.dim) * 0.02) if first else None
        self.blocks = nn.ModuleList(_Block(shape.dim, shape.heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(shape.dim) if last else None
        self.head = nn.Linear(shape.dim, shape.vocab, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tok is not None:
            assert self.pos is not None
            x = self.tok(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            assert self.ln is not None
            x = self.head(self.ln(x))
        return x


def gpt_stages(shape: GPTShape, num_stages: int, seed: int = 0) -> list[nn.Module]:
    """The ``num_stages`` stages of the model, identical for the same ``seed``."""
    if shape.layers < num_stages:
        raise ValueError(f"{shape.layers} layers cannot fill {num_stages} stages")
    torch.manual_seed(seed)
    per = [shape.layers // num_stages + (k < shape.layers % num_stages) for k in range(num_stages)]
    return [_Stage(shape, per[k], k == 0, k == num_stages - 1) for k in range(num_stages)]


def gpt_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of one micro-batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def gpt_batch(shape: GPTShape, sequences: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, targets)`` of ``sequences`` random sequences (targets = ids shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape.vocab, (sequences, shape.seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
