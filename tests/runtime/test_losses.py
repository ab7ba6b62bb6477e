"""Loss reduction: "mean" keeps the loss values and gives the gradient of the mean."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dualpipe.runtime.losses import reduced_criterion


def test_mean_keeps_values_and_scales_gradients_exactly() -> None:
    w = torch.randn(3, requires_grad=True)
    xs, ys = torch.randn(4, 3), torch.randn(4)
    crit = reduced_criterion(F.mse_loss, "mean", 4)
    for x, y in zip(xs, ys, strict=True):
        loss = crit(x @ w, y)
        assert torch.equal(loss, F.mse_loss(x @ w, y))
        loss.backward()
    ref = w.detach().clone().requires_grad_()
    torch.stack([F.mse_loss(x @ ref, y) for x, y in zip(xs, ys, strict=True)]).mean().backward()
    torch.testing.assert_close(w.grad, ref.grad, rtol=1e-6, atol=0)
    assert reduced_criterion(F.mse_loss, "sum", 4) is F.mse_loss


def test_unknown_reduction_is_refused() -> None:
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        reduced_criterion(F.mse_loss, "avg", 4)


@pytest.mark.parametrize(("schedule", "world", "dp"), [
    ("dualpipe", 2, 1),     # two directions: the ends swap their counts
    ("dualpipev", 4, 2),    # two replicas: counts over the data-parallel group
])
def test_token_mean_is_the_token_mean_of_the_whole_padded_batch(
        schedule: str, world: int, dp: int) -> None:
    from dualpipe.testing import run_distributed

    from .losses_workers import token_mean

    for errors in run_distributed(token_mean, world, schedule, dp, timeout=120):
        assert errors and max(errors) <= 1e-5, errors
