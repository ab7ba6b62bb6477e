"""A drop-in for DeepSeek's DualPipe: code written against the original's API (its
examples' calling patterns) runs unchanged except for the documented summation of the
mirrored copies' gradients, with losses bit-equal and gradients equal to rounding."""

from __future__ import annotations

from typing import Any

import pytest

from dualpipe.testing import run_distributed

from .dropin_workers import all_cases


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    return run_distributed(all_cases, 4, timeout=240)


def test_original_examples_run_on_one_to_four_ranks(results: list[dict[str, Any]]) -> None:
    assert results[0]["report"] == [
        "dualpipev ranks=4 ok",
        "dualpipe ranks=4 ok",
        "dualpipe ranks=2 summed by hand ok",
        "dualpipev ranks=3 ok",
        "label-free criterion ok",
    ]
    assert results[3]["report"][2:] == [
        "dualpipev ranks=2 ok",
        "dualpipev ranks=1 ok",
        "label-free criterion ok",
    ]


def test_weight_grad_store_work_runs_deferred(results: list[dict[str, Any]]) -> None:
    for r in results:
        counts = r["counts"]
        assert counts["put"] > 0  # input-only backwards deferred the custom weight work
        assert counts["deferred_ran"] == counts["put"]  # ... and every piece ran once
        assert r["left"] == 0


def test_user_overlapped_forward_backward_is_used(results: list[dict[str, Any]]) -> None:
    assert all(r["counts"]["overlapped"] > 0 for r in results)
    assert any(r["counts"]["run_backward"] > 0 for r in results)


def test_declared_shapes_are_checked(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "set_p2p_tensor_shapes declared [(2, 3, 9)]" in r["declared"], r["declared"]
        assert "rank 0 failed in F0.0" in r["declared"]
