"""The transport on gloo: what it keeps of a message once the message is delivered."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .process_group_workers import (
    check_delivered_tensors_released,
    polling_costs_no_store_request,
)


@pytest.mark.parametrize("large", [False, True], ids=["small", "large"])
def test_delivered_sends_are_released(large: bool) -> None:
    sender, receiver = run_distributed(check_delivered_tensors_released, 2, large,
                                       timeout=60)
    assert sender == [True, True, True, True]  # per step: tensors freed, nothing listed
    assert receiver == [True] * 6


def test_polling_for_failures_asks_the_store_nothing_while_the_watch_runs() -> None:
    # the overlap engine's waiter polls check_error every 20-200 us: with gloo's failure
    # watch running, those polls must not be requests to the store, and a failure must
    # still reach the polling rank within the watch's period (0.2 s) plus slack
    (requests, delay), _ = run_distributed(polling_costs_no_store_request, 2, timeout=60)
    assert requests == 0
    assert 0.0 <= delay < 1.0, delay
