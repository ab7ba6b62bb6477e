"""The transport on gloo: what it keeps of a message once the message is delivered, and
what polling it for failures costs."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .process_group_workers import (
    check_delivered_tensors_released,
    polling_costs_no_store_request,
    waiting_part_polls_cheaply,
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


@pytest.mark.parametrize("fresh", [False, True], ids=["cheap", "fresh-control"])
def test_a_waiting_part_asks_the_store_nothing_per_poll(fresh: bool) -> None:
    # the overlap engine's waiter on a parted stage's all-to-all (2 processes), with the
    # pipeline's failure check: the waiter (main thread) makes no store request at all
    # (only the failure watch does, 2 per 0.2 s), yet a peer's failure ends the wait
    # within the watch's period plus slack. Control: check_error(fresh=True) asks at
    # every check (how the waiter polled before), so the same count is at least one
    # request per check.
    result, _ = run_distributed(waiting_part_polls_cheaply, 2, fresh, timeout=90)
    polls, main, requests = result["polls"], result["main_requests"], result["requests"]
    assert result["seconds"] > 0.3, result  # the waiter really waited for the peer
    assert polls >= result["seconds"] / 0.2, result  # it checked at least as often as the watch
    if fresh:
        assert main >= polls > 0, result
    else:
        assert main == 0, result
        assert requests <= 2 * (result["seconds"] / 0.2 + 2), result  # the watch's only
    assert 0.0 <= result["delay"] < 1.0, result
