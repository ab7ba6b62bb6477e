"""Tensor-parallel collectives as communication parts: values and gradients."""

from __future__ import annotations

import pytest

from dualpipe.overlap import AllGather, AllReduce
from dualpipe.testing import run_distributed

from .collective_workers import collectives


def test_collectives_forward_and_backward() -> None:
    names = ["gather", "gather_slice", "scatter", "reduce", "reduce_all"]
    assert run_distributed(collectives, 2, timeout=60) == [names, names]


def test_bad_backward_option() -> None:
    with pytest.raises(ValueError, match="identity"):
        AllReduce(backward="nope")
    with pytest.raises(ValueError, match="slice"):
        AllGather(backward="nope")
