"""dualpipe.clip against torch.nn.utils.clip_grad_norm_ on one process: DTensor gradients
(FSDP2-sharded and tensor-parallel stages) on a (pp=2, x=2) mesh of 4 gloo processes, and
NaN / inf gradients on either of 2 pipeline ranks (the norm and the error as torch's)."""

from __future__ import annotations

import math

import pytest

from dualpipe.testing import run_distributed

from .clip_workers import dtensor_stages, nonfinite


@pytest.fixture(scope="module")
def dtensor() -> list[dict[str, object]]:
    return run_distributed(dtensor_stages, 4, timeout=120)


def test_dtensor_gradients_two_norm(dtensor: list[dict[str, object]]) -> None:
    for r in dtensor:
        got, expect = r["norm"]  # type: ignore[misc]
        assert got == pytest.approx(expect, rel=1e-6), r
        assert expect > 0.5  # so the gradients were really scaled
        assert r["clipped_worst"] <= 1e-5, r  # type: ignore[operator]


def test_dtensor_gradients_max_norm_exact(dtensor: list[dict[str, object]]) -> None:
    assert all(r["inf_equal"] for r in dtensor), dtensor


def test_dtensor_gradients_with_data_group(dtensor: list[dict[str, object]]) -> None:
    for r in dtensor:
        got, expect = r["data_group_norm"]  # type: ignore[misc]
        assert got == pytest.approx(expect, rel=1e-6), r
        assert r["data_group_worst"] <= 1e-5, r  # type: ignore[operator]


def test_dtensor_nan_in_a_shard_propagates(dtensor: list[dict[str, object]]) -> None:
    assert all(math.isnan(r["nan_shard_norm"]) for r in dtensor), dtensor  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def nonfinite_results() -> list[dict[str, object]]:
    return run_distributed(nonfinite, 2, timeout=120)


def test_nonfinite_norm_as_torch_on_every_rank(nonfinite_results: list[dict[str, object]]) -> None:
    assert len(nonfinite_results[0]) == 5
    for r in nonfinite_results:
        for name, case in r.items():
            assert isinstance(case, dict)
            assert not math.isfinite(case["expect"]), (name, case)
            assert case["same"] and case["clipped_same"], (name, case)


def test_error_if_nonfinite_raises_on_every_rank(
    nonfinite_results: list[dict[str, object]],
) -> None:
    for r in nonfinite_results:
        for name, case in r.items():
            assert isinstance(case, dict)
            assert "is non-finite" in case["raised"], (name, case)
            assert case["untouched"], (name, case)  # nothing scaled when it raised
            assert case["scaled_as_torch"], (name, case)  # without it: as torch scales
