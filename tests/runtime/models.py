"""Small stage families for the runtime tests (importable by spawned processes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM = 8


class MLPStage(nn.Module):
    """Standard layers."""

    def __init__(self, d: int = DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.LayerNorm(d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SharedWeightStage(nn.Module):
    """Trap: one weight used twice in a stage."""

    def __init__(self, d: int = DIM) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.tanh(x @ self.w) @ self.w)


class MultiOutputStage(nn.Module):
    """Trap: multi-output autograd nodes (chunk, split, unbind) between input and weights
    and on the weight side."""

    def __init__(self, d: int = DIM) -> None:
        super().__init__()
        self.lin = nn.Linear(d, 2 * d)
        self.w = nn.Parameter(torch.randn(2 * d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lin(x).chunk(2, dim=-1)
        w1, w2 = self.w.split(self.w.shape[0] // 2, dim=0)
        parts = torch.stack([a @ w1, b @ w2]).unbind(0)
        return torch.tanh(parts[0] + parts[1])


class ParamFreeStage(nn.Module):
    """Trap: no parameters at all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 + torch.sin(x)


class EmbeddingStage(nn.Module):
    """Trap: the stage's input (token ids) needs no gradient."""

    def __init__(self, d: int = DIM, vocab: int = 11) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids).mean(dim=1)


class TwoTensorStage(nn.Module):
    """Two tensors cross every boundary; the second is a mask that needs no gradient."""

    def __init__(self, d: int = DIM) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)) * mask + x, mask


def build_stages(kind: str, num_stages: int, seed: int = 0) -> list[nn.Module]:
    """The stages ``S_0 ... S_{k-1}`` of a test model, deterministic in ``seed``."""
    torch.manual_seed(seed)
    if kind == "mlp":
        return [MLPStage() for _ in range(num_stages)]
    if kind == "traps":
        cycle = [SharedWeightStage, MultiOutputStage, ParamFreeStage, MLPStage]
        stages: list[nn.Module] = [EmbeddingStage()]
        stages += [cycle[i % len(cycle)]() for i in range(num_stages - 1)]
        return stages
    if kind == "two":
        return [TwoTensorStage() for _ in range(num_stages)]
    raise ValueError(kind)


def make_batch(
    kind: str, batch: int, seed: int = 1
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(inputs, labels) for a model family."""
    g = torch.Generator().manual_seed(seed)
    if kind == "traps":
        inputs: tuple[torch.Tensor, ...] = (torch.randint(0, 11, (batch, 3), generator=g),)
    elif kind == "two":
        x = torch.randn(batch, DIM, generator=g)
        mask = (torch.rand(batch, DIM, generator=g) > 0.3).float()
        inputs = (x, mask)
    else:
        inputs = (torch.randn(batch, DIM, generator=g),)
    return inputs, torch.randn(batch, DIM, generator=g)


def criterion(*args: torch.Tensor) -> torch.Tensor:
    """MSE of the first output against the last argument (the label)."""
    return F.mse_loss(args[0], args[-1])
