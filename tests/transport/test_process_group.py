"""The transport on gloo: what it keeps of a message once the message is delivered."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .process_group_workers import check_delivered_tensors_released


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_delivered_sends_are_released(large: bool) -> None:
    sender, receiver = run_distributed(check_delivered_tensors_released, 2, large,
                                       timeout=60)
    assert sender == [True, True, True, True]  # per step: tensors freed, nothing listed
    assert receiver == [True] * 6
