"""Completion times of communication parts: timed by the handles' futures, or not at all."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dualpipe.overlap import (
    AsyncComm,
    ForwardTask,
    InFlight,
    PartedStage,
    PartEvent,
    Waiter,
    run_backward,
    run_forward,
)


class _Handle:
    """A handle that a timer thread completes ``delay`` seconds after it was made
    (``done_at``: ``time.perf_counter()`` just before it completed). No ``get_future``."""

    def __init__(self, delay: float) -> None:
        self._future: torch.futures.Future[None] = torch.futures.Future()
        self.done_at: float | None = None
        self._timer = threading.Timer(delay, self._complete)
        self._timer.start()

    def _complete(self) -> None:
        self.done_at = time.perf_counter()
        self._future.set_result(None)

    def is_completed(self) -> bool:
        return self._future.done()

    def wait(self) -> bool:
        self._future.wait()
        return True


class _FutureHandle(_Handle):
    """The same with ``get_future()``."""

    def get_future(self) -> torch.futures.Future[None]:
        return self._future


class _Doubling(AsyncComm):
    """A custom communication part: doubles its input (and, backward, the gradient),
    completing ``delay`` seconds after launch through a handle of ``handle``'s type."""

    def __init__(self, handle: type[_Handle], delay: float, timed: bool = True) -> None:
        self.handle, self.delay, self.timed = handle, delay, timed
        self.handles: list[_Handle] = []

    def _run(self, x: Tensor) -> InFlight:
        h = self.handle(self.delay)
        self.handles.append(h)
        return InFlight([h], lambda: (2 * x,), timed=self.timed)

    def launch(self, inputs: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        return self._run(inputs[0])

    def launch_backward(self, grads: tuple[Tensor, ...], ctx: dict[str, Any]) -> InFlight:
        return self._run(grads[0])


class _Stage(PartedStage):
    """A linear layer, the communication part, a sum."""

    def __init__(self, op: AsyncComm) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.op = op

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        y = yield self.op(self.lin(x))
        return y.square().sum()


def test_a_handle_without_get_future_is_refused() -> None:
    stage = _Stage(_Doubling(_Handle, 0.01))
    with pytest.raises(TypeError, match=r"handle of type _Handle has no get_future\(\).*"
                                        r"timed=False"):
        run_forward(stage, (torch.ones(2, 4),))


def test_a_get_future_that_fails_is_refused() -> None:
    class Broken(_Handle):
        def get_future(self) -> Any:
            raise RuntimeError("Work::getFuture not implemented.")

    with pytest.raises(TypeError, match=r"get_future\(\) of a handle of type Broken failed "
                                        r"\(Work::getFuture not implemented.\).*timed=False"):
        InFlight([Broken(0.01)], lambda: ())


def test_untimed_work_runs_and_records_no_communication_interval() -> None:
    x = torch.randn(2, 4)
    stage = _Stage(_Doubling(_Handle, 0.05, timed=False))
    events: list[PartEvent] = []
    waiter = Waiter(timeout=10, events=events)
    record = run_forward(stage, (x,), waiter)
    run_backward(record, [record.outputs], [None], waiter)
    reference = _Stage(_Doubling(_Handle, 0.0, timed=False))
    expected = (2 * reference.lin(x)).square().sum()
    expected.backward()
    assert torch.equal(record.outputs, expected)
    for ours, ref in zip(stage.parameters(), reference.parameters(), strict=True):
        assert ours.grad is not None and ref.grad is not None
        assert torch.equal(ours.grad, ref.grad)
    kinds = [e.kind for e in events]
    assert "comm" not in kinds, events
    assert kinds.count("compute") == 4  # two parts forward, two backward
    assert kinds.count("wait") == 2  # the waits themselves are measured, forward and back


def test_timed_work_ends_when_its_future_completed_not_when_the_engine_looked() -> None:
    op = _Doubling(_FutureHandle, 0.02)
    events: list[PartEvent] = []
    task = ForwardTask(_Stage(op), (torch.randn(2, 4),), Waiter(timeout=10, events=events))
    task.step()  # part 0, then the communication is launched
    launched = time.perf_counter()
    time.sleep(0.3)  # the engine is busy elsewhere (another micro-batch's part)
    looked = time.perf_counter()
    task.step()  # finds the communication completed long ago
    assert task.done
    (comm,) = [e for e in events if e.kind == "comm"]
    done_at = op.handles[0].done_at
    assert done_at is not None
    assert comm.start <= launched < done_at
    assert 0.0 <= comm.end - done_at < 0.05, (comm.end - done_at)
    assert looked - comm.end > 0.2  # not the time the engine looked
    assert not [e for e in events if e.kind == "wait"]  # nothing was waited for


def test_work_with_nothing_to_wait_for_completed_when_made() -> None:
    before = time.perf_counter()
    pending = InFlight([], lambda: ())
    done = pending.completed_at
    assert done is not None and before <= done <= time.perf_counter()
    assert InFlight([], lambda: (), timed=False).completed_at is None


def test_the_waiter_blocks_on_the_futures_and_wakes_when_they_complete() -> None:
    checks = [0]

    def check() -> None:
        checks[0] += 1

    handle = _FutureHandle(0.3)
    pending = InFlight([handle], lambda: ())
    cpu = time.thread_time()
    Waiter(timeout=10, check=check).wait(pending, "a comm")
    woke = time.perf_counter()
    cpu = time.thread_time() - cpu
    assert handle.done_at is not None
    assert 0.0 <= woke - handle.done_at < 0.1, woke - handle.done_at
    # blocked between checks every check_period (0.01 s), not polling every 20-200 us
    assert 5 <= checks[0] <= 0.3 / Waiter.check_period + 10, checks[0]
    assert cpu < 0.1, cpu
    # untimed: nothing to block on (settle says so at once), so the waiter polls, and
    # still ends when the work is done
    untimed = InFlight([_Handle(0.1)], lambda: (), timed=False)
    start = time.perf_counter()
    assert untimed.settle(5.0) is False
    assert time.perf_counter() - start < 1.0
    Waiter(timeout=10, check=check).wait(untimed, "x")
    assert untimed.ready()
