"""dualpipe.clip against torch.nn.utils.clip_grad_norm_ on one process: DTensor gradients
(FSDP2-sharded and tensor-parallel stages) on a (pp=2, x=2) mesh of 4 gloo processes."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .clip_workers import dtensor_stages


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
