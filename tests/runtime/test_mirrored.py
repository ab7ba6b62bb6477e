"""DualPipe's mirrored stages: gradients summed only where they exist, accumulated in
place, frozen weights left alone; copies that disagree are refused at construction."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .mirrored_workers import all_cases


@pytest.fixture(scope="module")
def results() -> list[dict[str, object]]:
    return run_distributed(all_cases, 2, timeout=120)


def test_frozen_and_unused_parameters_get_no_gradient(results: list[dict[str, object]]) -> None:
    for r in results:
        assert r["no_grad_for_frozen_or_unused"]
        assert r["frozen_kept"]  # AdamW's weight decay did not move them
        assert r["trained"] and r["copies_equal"]


def test_gradients_accumulate_in_place(results: list[dict[str, object]]) -> None:
    for r in results:
        assert r["same_grad_tensors"]
        assert r["accumulated"]
        assert r["one_exchange"]  # one flattened message per step


def test_requires_grad_changed_after_construction(results: list[dict[str, object]]) -> None:
    for r in results:
        unfrozen, frozen, message = r["changed"]  # type: ignore[misc]
        assert unfrozen and frozen
        assert "requires_grad of the mirrored parameter module." in message, message
        assert "net.2.weight (stage 1) is" in message


def test_construction_errors(results: list[dict[str, object]]) -> None:
    for r in results:
        frozen, mapping = r["errors"]  # type: ignore[misc]
        assert "disagree on requires_grad of parameter module." in frozen, frozen
        assert "net.0.weight" in frozen
        assert "must be a permutation of 0..1" in mapping, mapping


def test_state_dict_keys_match_the_original(results: list[dict[str, object]]) -> None:
    for r in results:
        keys = r["keys"]
        assert isinstance(keys, list) and keys
        assert all(k.startswith(("module.0.", "module.1.")) for k in keys), keys
        assert r["old_checkpoint_loads"]


def test_tied_embedding_and_head_counted_once(results: list[dict[str, object]]) -> None:
    for r in results:
        tied = r["tied"]
        assert isinstance(tied, dict)
        assert tied["worst"] <= 1e-5, tied  # every gradient, relative to one process
        assert tied["tied_rel"] <= 1e-5, tied
        assert tied["grads_equal"] and tied["weights_equal"], tied
