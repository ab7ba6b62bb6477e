"""The step's per-rank primitives (dualpipe.runtime.run) on 2 gloo ranks: a training loss
without gradient is an error on every rank, as it is on one process; a stage whose outputs
carry no gradient despite trainable parameters is warned about and stays exact."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .run_workers import loss_without_grad


@pytest.fixture(scope="module")
def results() -> list[dict[str, object]]:
    return run_distributed(loss_without_grad, 2, timeout=120)


@pytest.mark.parametrize("case", ["detached", "reentrant"])
def test_loss_without_grad_fails_on_every_rank(
    results: list[dict[str, object]], case: str
) -> None:
    assert results[0][f"{case}_one_process"]  # one process raises in backward() too
    (first, t0), (second, t1) = results[0][case], results[1][case]  # type: ignore[misc]
    assert first.startswith("ActionFailure: rank 0 failed in F1."), first
    assert "the loss of micro-batch" in first and "does not require grad" in first, first
    assert second.startswith("RemoteFailure: "), second
    assert "rank 0 failed in F1." in second, second
    assert t0 < 10.0 and t1 < 10.0  # the pipeline's timeout is 30 s


def test_stage_output_without_grad_warns_and_matches_one_process(
    results: list[dict[str, object]],
) -> None:
    for r in results:
        assert r["stage0_only"][0] == "no error", r  # type: ignore[index]
        assert r["stage0_only_same"] and r["stage0_no_grad"], r
    warned = results[0]["warnings"]
    assert isinstance(warned, list) and warned, results[0]
    assert "stage 0" in warned[0] and "requires_grad_(False)" in warned[0], warned
    assert results[1]["warnings"] == []
