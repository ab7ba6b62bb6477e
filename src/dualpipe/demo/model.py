"""A small GPT-style language model and its split into pipeline stages."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GPTConfig",
    "Embed",
    "Block",
    "Head",
    "GPT",
    "GPTStage",
    "build_gpt",
    "gpt_stages",
    "split_gpt",
    "stage_sizes",
]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model.

    Attributes:
        vocab_size: number of token ids.
        seq_len: longest sequence (size of the position table).
        dim: width of the residual stream.
        n_head: attention heads (``dim`` must be divisible by it).
        n_layer: transformer blocks.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    """

    vocab_size: int = 16
    seq_len: int = 24
    dim: int = 64
    n_head: int = 4
    n_layer: int = 6
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "dim", "n_head", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_layer < 0:
            raise ValueError(f"GPTConfig.n_layer must be >= 0, got {self.n_layer}")
        if self.dim % self.n_head:
            raise ValueError(
                f"GPTConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})"
            )


class Embed(nn.Module):
    """Token plus learned position embedding: ``ids [B, T] -> x [B, T, dim]``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Embedding(config.seq_len, config.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Embed ``ids`` (int64, ``[B, T]`` with ``T <= seq_len``)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(positions)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions 0..t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, dim] -> [B, T, dim]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.dim)
        hidden = config.mlp_ratio * config.dim
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, dim] -> [B, T, dim]``."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.out = nn.Linear(config.dim, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, dim] -> logits [B, T, vocab]``."""
        return self.out(self.norm(x))


class GPT(nn.Module):
    """The whole model on one device: ``ids [B, T] -> logits [B, T, vocab]``.

    Weights use the GPT-2 recipe: normal(0, 0.02), residual output projections
    scaled down by ``sqrt(2 * n_layer)``, zero biases, unit LayerNorms.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.head = Head(config)
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * max(1, self.config.n_layer))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def pieces(self) -> list[nn.Module]:
        """The chain of modules the model applies in order: embed, blocks..., head."""
        return [self.embed, *self.blocks, self.head]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position of ``ids``."""
        x = ids
        for piece in self.pieces():
            x = piece(x)
        return x


class GPTStage(nn.Module):
    """A consecutive run of the model's pieces (one pipeline stage).

    Attributes:
        pieces: the modules applied in order.
        first: whether the stage starts with the embedding (its input is token ids).
        last: whether the stage ends with the head (its output is logits).
    """

    def __init__(self, pieces: Sequence[nn.Module]) -> None:
        super().__init__()
        if not pieces:
            raise ValueError("a GPT stage needs at least one piece")
        self.pieces = nn.ModuleList(pieces)
        self.first = isinstance(pieces[0], Embed)
        self.last = isinstance(pieces[-1], Head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the stage's pieces in order."""
        for piece in self.pieces:
            x = piece(x)
        return x

    def extra_repr(self) -> str:
        return ", ".join(type(p).__name__ for p in self.pieces)


def build_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A :class:`GPT` whose weights depend only on ``config`` and ``seed`` (the global
    random state is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(config)


def stage_sizes(num_pieces: int, num_stages: int) -> list[int]:
    """How many consecutive pieces each stage gets: as even as possible, the extra
    pieces going to the inner stages first (the first and last stages already carry
    the embedding and the head)."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_pieces < num_stages:
        raise ValueError(
            f"cannot split {num_pieces} pieces (embedding, {num_pieces - 2} blocks, head) "
            f"into {num_stages} non-empty stages; use n_layer >= {num_stages - 2}"
        )
    sizes = [num_pieces // num_stages] * num_stages
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1][: min(2, num_stages)]
    for k in order[: num_pieces % num_stages]:
        sizes[k] += 1
    return sizes


def split_gpt(model: GPT, num_stages: int, *, share: bool = False) -> list[GPTStage]:
    """Cut ``model`` into ``num_stages`` consecutive :class:`GPTStage` modules.

    Composing the stages (``stage[k+1](stage[k](x))``...) equals ``model(x)`` exactly.
    With ``share=False`` (default) the stages hold deep copies of the model's modules,
    so training them leaves ``model`` as it was; ``share=True`` reuses the modules.
    """
    pieces = model.pieces()
    stages: list[GPTStage] = []
    start = 0
    for size in stage_sizes(len(pieces), num_stages):
        chunk = pieces[start : start + size]
        stages.append(GPTStage(chunk if share else [copy.deepcopy(p) for p in chunk]))
        start += size
    return stages


def gpt_stages(config: GPTConfig, num_stages: int, seed: int = 0) -> list[GPTStage]:
    """The ``num_stages`` pipeline stages of ``build_gpt(config, seed)``.

    Every process calling it with the same arguments gets the same weights, so each
    rank can build all stages and keep the ones it runs (for DualPipe, both copies
    of a stage start identical).
    """
    return split_gpt(build_gpt(config, seed), num_stages, share=True)
