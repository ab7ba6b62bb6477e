"""A synthetic next-token task that needs no download: copy a random prefix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["IGNORE", "SEP", "FIRST_SYMBOL", "CopyTask", "lm_loss"]

IGNORE = -100
"""Target value of positions that do not count in the loss."""
SEP = 1
"""Separator token between the prefix and its copy (token 0 is unused padding)."""
FIRST_SYMBOL = 2
"""Smallest token id used for symbols."""


@dataclass(frozen=True)
class CopyTask:
    """Copy a random prefix of ``prefix_len`` symbols drawn from ``vocab_size - 2`` ids.

    Attributes:
        vocab_size: token ids the model knows (ids 0 and 1 are reserved).
        prefix_len: symbols to copy; sequences have ``2 * prefix_len + 1`` tokens.
    """

    vocab_size: int = 16
    prefix_len: int = 11

    def __post_init__(self) -> None:
        if self.vocab_size < FIRST_SYMBOL + 2:
            raise ValueError(f"CopyTask.vocab_size must be >= 4, got {self.vocab_size}")
        if self.prefix_len < 1:
            raise ValueError(f"CopyTask.prefix_len must be >= 1, got {self.prefix_len}")

    @property
    def seq_len(self) -> int:
        """Tokens per model input (the full sequence minus its last token)."""
        return 2 * self.prefix_len + 1

    @property
    def chance_loss(self) -> float:
        """Loss of a model that knows the format but guesses symbols uniformly."""
        return math.log(self.vocab_size - FIRST_SYMBOL)

    def batch(self, size: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, targets)``, both int64 ``[size, seq_len]``, determined by
        ``(seed, step)`` alone.

        ``targets[:, t]`` is the token after ``tokens[:, t]`` where it counts (the
        copied symbols) and :data:`IGNORE` elsewhere.
        """
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        k = self.prefix_len
        prefix = torch.randint(FIRST_SYMBOL, self.vocab_size, (size, k), generator=gen)
        sep = torch.full((size, 1), SEP, dtype=torch.int64)
        full = torch.cat([prefix, sep, prefix, sep], dim=1)  # 2k + 2 tokens
        tokens = full[:, :-1].clone()
        targets = full[:, 1:].clone()
        targets[:, :k] = IGNORE  # predicting the random prefix is hopeless
        targets[:, -1] = IGNORE  # after the copy: nothing to learn
        return tokens, targets


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token ``logits [B, T, V]`` over the counted
    ``targets [B, T]`` (positions equal to :data:`IGNORE` are left out)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
