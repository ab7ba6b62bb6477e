"""A schedule made by either library runs on the other: ours exported as PyTorch's CSV
trains exactly on PyTorch's pipelining runtime; PyTorch's generated ZBV, imported,
trains exactly on ours."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .torch_workers import run_ours_on_torch, run_torch_zbv_on_ours


@pytest.mark.parametrize(
    ("name", "world", "chunks"),
    [("v-half", 2, 3), ("interleaved-1f1b", 2, 4)],  # the V and the loop layout
)
def test_our_schedule_on_pytorch_runtime(name: str, world: int, chunks: int) -> None:
    assert run_distributed(run_ours_on_torch, world, name, chunks, timeout=120) == [
        f"{name} on torch ok"
    ] * world


def test_pytorch_zbv_on_our_runtime() -> None:
    reports = run_distributed(run_torch_zbv_on_ours, 3, 5, timeout=120)
    assert reports == ["torch-zbv ranks=3 chunks=5 ok"] * 3
