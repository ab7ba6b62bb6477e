"""Spawned-rank functions for tests/runtime/test_run.py: losses and stage outputs that carry
no gradient."""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dualpipe.errors import PipelineError
from dualpipe.runtime.pipeline import DualPipeV

from .models import EmbeddingStage, MLPStage, criterion, make_batch

CHUNKS = 4


class Reentrant(nn.Module):
    """A stage run under reentrant activation checkpointing: its output has a gradient
    only if one of its inputs requires grad."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = checkpoint(self.stage, x, use_reentrant=True)
        assert isinstance(out, torch.Tensor)
        return out


def _detached(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, label).detach()


def _model(reentrant: tuple[int, ...]) -> list[nn.Module]:
    """4 stages: token ids into an embedding, then MLPs; those in ``reentrant`` wrapped."""
    torch.manual_seed(0)
    stages: list[nn.Module] = [EmbeddingStage(), MLPStage(), MLPStage(), MLPStage()]
    return [Reentrant(s) if k in reentrant else s for k, s in enumerate(stages)]


def _run(rank: int, stages: list[nn.Module], loss_fn: object) -> tuple[str, float]:
    """One DualPipeV step on 2 ranks; the error message (or "no error") and its time."""
    pipe = DualPipeV([stages[rank], stages[3 - rank]], timeout=30.0)
    (ids,), y = make_batch("traps", 8, seed=1)
    t0 = time.monotonic()
    try:
        if rank == 0:
            pipe.step(ids, num_chunks=CHUNKS, criterion=loss_fn, labels=(y,))
        else:
            pipe.step(num_chunks=CHUNKS)
    except PipelineError as exc:
        return f"{type(exc).__name__}: {exc}", time.monotonic() - t0
    finally:
        pipe.close()
    return "no error", time.monotonic() - t0


def _one_process_fails(stages: list[nn.Module], loss_fn: object) -> bool:
    """Whether ``loss.backward()`` raises on one process for the same model."""
    (ids,), y = make_batch("traps", 8, seed=1)
    h = ids[:2]
    for s in stages:
        h = s(h)
    loss = loss_fn(h, y[:2])  # type: ignore[operator]
    try:
        loss.backward()
    except RuntimeError:
        return True
    return False


def loss_without_grad(rank: int, world: int) -> dict[str, object]:
    """A criterion that detaches, and reentrant checkpointing around every stage (stage 0's
    input being integer ids): one process raises in ``backward``; the pipeline raises on
    every rank, quickly. Reentrant checkpointing around stage 0 only: its outputs carry no
    gradient although it has trainable parameters — a warning names the stage, and the
    gradients equal one process's (stage 0's parameters get none there either)."""
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's checkpoint warns about the ids
        out["detached"] = _run(rank, _model(()), _detached)
        out["detached_one_process"] = _one_process_fails(_model(()), _detached)
        out["reentrant"] = _run(rank, _model((0, 1, 2, 3)), criterion)
        out["reentrant_one_process"] = _one_process_fails(_model((0, 1, 2, 3)), criterion)

    stages = _model((0,))
    ref = copy.deepcopy(stages)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run(rank, stages, criterion)
    out["stage0_only"] = result
    out["warnings"] = [str(w.message) for w in caught if w.category is UserWarning
                       and "dualpipe" in str(w.message)]
    (ids,), y = make_batch("traps", 8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for xs, ys in zip(ids.tensor_split(CHUNKS), y.tensor_split(CHUNKS), strict=True):
            h = xs
            for s in ref:
                h = s(h)
            criterion(h, ys).backward()
    same = True
    for k in (rank, 3 - rank):
        for p, q in zip(stages[k].parameters(), ref[k].parameters(), strict=True):
            if q.grad is None or p.grad is None:
                same = same and p.grad is None and q.grad is None
            else:
                same = same and bool(((p.grad - q.grad).norm() <= 1e-5 * q.grad.norm()).item())
    out["stage0_only_same"] = same
    out["stage0_no_grad"] = rank != 0 or all(p.grad is None for p in stages[0].parameters())
    return out
