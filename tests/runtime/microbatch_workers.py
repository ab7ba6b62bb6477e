"""Spawned-rank functions for tests/runtime/test_microbatch.py."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dualpipe.runtime.pipeline import DualPipeV

from .models import DIM, MLPStage

CHUNKS = 4


class AuxStage(MLPStage):
    """An MLP stage that adds to an auxiliary 0-dim loss travelling with the activation
    (stage 0 starts it)."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.first = first

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = args[0]
        aux = x.new_zeros(()) if self.first else args[1]
        h = super().forward(x)
        return h, aux + h.pow(2).mean()


def _criterion(h: torch.Tensor, aux: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(h, y) + 0.1 * aux


def zero_dim_outputs(rank: int, world: int) -> dict[str, object]:
    """DualPipeV on 2 ranks whose stages return ``(activation, aux loss)`` with a 0-dim aux:
    ``return_outputs=True`` gives the activations concatenated and the aux losses stacked
    per micro-batch (shape [C]), both equal to one process, as are the losses and
    gradients."""
    torch.manual_seed(0)
    stages: list[nn.Module] = [AuxStage(first=k == 0) for k in range(4)]
    ref = copy.deepcopy(stages)
    pipe = DualPipeV([stages[rank], stages[3 - rank]], timeout=30.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, DIM, generator=g), torch.randn(8, DIM, generator=g)
    if rank == 0:
        losses, outputs = pipe.step(x, num_chunks=CHUNKS, criterion=_criterion, labels=(y,),
                                    return_outputs=True)
    else:
        losses, outputs = pipe.step(num_chunks=CHUNKS, return_outputs=True)
    hs, auxes, expect_losses = [], [], []
    for xs, ys in zip(x.tensor_split(CHUNKS), y.tensor_split(CHUNKS), strict=True):
        out: tuple[torch.Tensor, ...] = (xs,)
        for s in ref:
            out = s(*out)
        loss = _criterion(*out, ys)
        loss.backward()
        hs.append(out[0].detach())
        auxes.append(out[1].detach())
        expect_losses.append(loss.detach())
    result: dict[str, object] = {}
    if rank == 0:
        assert isinstance(outputs, tuple) and losses is not None
        h, aux = outputs
        result["shapes"] = (tuple(h.shape), tuple(aux.shape))
        result["outputs_equal"] = torch.equal(h, torch.cat(hs)) and torch.equal(
            aux, torch.stack(auxes))
        result["losses_equal"] = torch.equal(losses, torch.stack(expect_losses))
    else:
        result["nothing_here"] = losses is None and outputs is None
    worst = 0.0
    for k in (rank, 3 - rank):
        for p, q in zip(stages[k].parameters(), ref[k].parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            worst = max(worst, ((p.grad - q.grad).norm() / q.grad.norm()).item())
    result["worst"] = worst
    return result
