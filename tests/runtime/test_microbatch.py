"""Splitting batches into micro-batches and putting outputs back together: 0-dim outputs
(an auxiliary loss travelling with the activations) come back stacked per micro-batch."""

from __future__ import annotations

import pytest
import torch

from dualpipe.runtime.microbatch import concat_chunks
from dualpipe.testing import run_distributed

from .microbatch_workers import zero_dim_outputs


def test_concat_chunks_stacks_zero_dim_outputs() -> None:
    chunks = [(torch.full((2, 3), float(c)), torch.tensor(float(c))) for c in range(4)]
    h, aux = concat_chunks(chunks, batch_dim=0)
    assert torch.equal(h, torch.cat([c[0] for c in chunks]))
    assert torch.equal(aux, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    h1, aux1 = concat_chunks(chunks, batch_dim=1)  # batch_dim applies to the others only
    assert h1.shape == (2, 12) and aux1.shape == (4,)


def test_concat_chunks_refuses_an_output_without_batch_dim() -> None:
    chunks = [(torch.zeros(3),), (torch.zeros(3),)]
    with pytest.raises(ValueError, match="output 0 has 1 dim"):
        concat_chunks(chunks, batch_dim=1)


def test_return_outputs_with_a_zero_dim_output_equals_one_process() -> None:
    rank0, rank1 = run_distributed(zero_dim_outputs, 2, timeout=120)
    assert rank0["shapes"] == ((8, 8), (4,)), rank0
    assert rank0["outputs_equal"] and rank0["losses_equal"], rank0
    assert rank1["nothing_here"], rank1
    for r in (rank0, rank1):
        assert r["worst"] <= 1e-5, r  # type: ignore[operator]
