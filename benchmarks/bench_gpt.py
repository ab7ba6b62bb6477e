"""The demo's GPT-style model cut into pipeline stages, for the real-compute benchmark row.

``ids [B, T] -> embedding (+ positions) -> blocks -> LayerNorm -> head -> logits``
(:mod:`dualpipe.demo.model`). :func:`gpt_stages` builds the stages deterministically
from a seed, so every rank (and both runtimes) gets bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe.demo.model import GPTConfig
from dualpipe.demo.model import gpt_stages as demo_gpt_stages

__all__ = ["GPTShape", "gpt_stages", "gpt_loss", "gpt_batch"]


@dataclass(frozen=True)
class GPTShape:
    """Model and batch shape.

    Attributes:
        vocab: token ids.
        seq: tokens per sequence.
        dim: residual width.
        heads: attention heads.
        layers: transformer blocks (with the embedding and the head, spread over the stages).
        mb: sequences per micro-batch.
    """

    vocab: int = 512
    seq: int = 64
    dim: int = 128
    heads: int = 4
    layers: int = 4
    mb: int = 4


def gpt_stages(shape: GPTShape, num_stages: int, seed: int = 0) -> list[nn.Module]:
    """The ``num_stages`` stages of the demo's GPT (:mod:`dualpipe.demo.model`) at this
    shape, identical for the same ``seed``: the benchmark times the model users run
    first."""
    config = GPTConfig(
        vocab_size=shape.vocab, seq_len=shape.seq, dim=shape.dim, n_head=shape.heads,
        n_layer=shape.layers,
    )
    return list(demo_gpt_stages(config, num_stages, seed=seed))


def gpt_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of one micro-batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def gpt_batch(shape: GPTShape, sequences: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, targets)`` of ``sequences`` random sequences (targets = ids shifted by one)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, shape.vocab, (sequences, shape.seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
