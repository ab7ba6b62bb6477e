"""dualpipe.utils: the original's WeightGradStore semantics and run_backward."""

from __future__ import annotations

import pytest
import torch

from dualpipe.utils import WeightGradStore, run_backward


@pytest.fixture(autouse=True)
def _clean_store() -> None:
    WeightGradStore.clear()
    WeightGradStore.enabled = False


def test_flush_and_pop_run_groups_in_order_without_autograd() -> None:
    ran: list[tuple[str, bool]] = []
    for name in ("a", "b", "c"):
        WeightGradStore.put(lambda n=name: ran.append((n, torch.is_grad_enabled())))
        if name != "b":
            WeightGradStore.flush()  # groups: [a], [b, c]
    WeightGradStore.pop()
    assert ran == [("a", False)]
    WeightGradStore.pop()
    assert ran == [("a", False), ("b", False), ("c", False)]
    with pytest.raises(RuntimeError, match="no flushed group"):
        WeightGradStore.pop()


def test_clear_forgets_everything() -> None:
    WeightGradStore.put(lambda: None)
    WeightGradStore.flush()
    WeightGradStore.put(lambda: None)
    WeightGradStore.clear()
    assert WeightGradStore.cache == [] and WeightGradStore.funcs_queue.empty()


def test_collect_enables_the_store_and_keeps_what_was_there() -> None:
    def outer() -> None:
        return None

    def inner() -> None:
        return None

    WeightGradStore.put(outer)
    got: list = []
    with WeightGradStore.collect(got):
        assert WeightGradStore.enabled
        WeightGradStore.put(inner)
    assert got == [inner]
    assert not WeightGradStore.enabled and WeightGradStore.cache == [outer]


def test_put_refuses_non_callables() -> None:
    with pytest.raises(TypeError, match="callable"):
        WeightGradStore.put(3)  # type: ignore[arg-type]


def test_run_backward_accumulates_and_skips_what_has_no_gradient() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(2, 3)
    y, z = x @ w, (x @ w).sum()
    frozen = torch.randn(2, 3)  # needs no gradient: skipped
    g = torch.randn(2, 3)
    run_backward([y, frozen, z], [g, g, None])  # z: one element, implicit gradient 1
    expect = x.T @ g + x.T @ torch.ones(2, 3)
    torch.testing.assert_close(w.grad, expect)
    with pytest.raises(ValueError, match="2 tensors but 1 gradients"):
        run_backward([y, z], [g])
