"""Spawned-rank functions for the transport tests."""

from __future__ import annotations

import gc
import weakref

import torch

from dualpipe.transport.process_group import Transport


def _start_watch(transport: Transport, rank: int) -> None:
    """Begin step 1 and swap one message each way (the failure watch starts with the
    first message)."""
    transport.begin_step(1)
    if rank == 0:
        transport.send([torch.ones(4)], 1, 0)
        transport.wait(transport.recv([torch.zeros(4)], 1, 1), "a message")
    else:
        buf = torch.zeros(4)
        transport.wait(transport.recv([buf], 0, 0), "a message")
        transport.send([buf], 0, 1)
    transport.drain_sends("sends")

def check_delivered_tensors_released(rank: int, world: int, large: bool) -> list[bool]:
    """Rank 0 sends three messages to rank 1 (which sends nothing back), over two steps.
    Once the sends are completed, nothing of the transport holds their tensors, and no
    delivered send is left listed for collection. ``large``: through the large-message
    thread. Returns rank 0's checks, or rank 1's "received intact" checks."""
    del world
    if large:
        Transport.large_message = 1
    transport = Transport(None, [0, 1], rank, torch.device("cpu"), timeout=30.0)
    checks: list[bool] = []
    for step in range(2):
        transport.begin_step(step)
        if rank == 0:
            sent = [torch.full((1000,), float(step + k)) for k in range(3)]
            refs = [weakref.ref(t) for t in sent]
            for k, t in enumerate(sent):
                transport.send([t], 1, k)
            del sent, t
            transport.drain_sends("sends")
            gc.collect()
            checks.append(all(r() is None for r in refs))
            checks.append(sum(len(q) for q in transport._unmatched.values()) == 0)
        else:
            for k in range(3):
                buf = torch.zeros(1000)
                transport.wait(transport.recv([buf], 0, k), "a message")
                checks.append(torch.equal(buf, torch.full((1000,), float(step + k))))
    transport.close()
    return checks


class _CountingStore:
    """Wraps the process group's store and counts the requests made through it (all, and
    those of the main thread in ``main``)."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self.store, self.requests, self.main = store, 0, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        import threading

        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.requests += 1
            self.main += threading.current_thread() is threading.main_thread()
            return attr(*args, **kwargs)

        return counted


def polling_costs_no_store_request(rank: int, world: int) -> tuple[int, float]:
    """Rank 0 polls ``check_error`` in a tight loop (as the overlap engine's waiter
    does) while rank 1 posts a failure after 0.5 s. Returns (store requests made by
    the polls on rank 0, seconds from the failure to rank 0 noticing it); rank 1
    returns (0, 0)."""
    import time

    import torch.distributed as dist

    from dualpipe.errors import RemoteFailure

    transport = Transport(None, [0, 1], rank, torch.device("cpu"), timeout=30.0)
    transport.key = "dualpipe/poll-test"
    _start_watch(transport, rank)
    dist.barrier()
    if rank == 1:
        time.sleep(0.5)
        transport.store.set("dualpipe/poll-test/posted-at", str(time.time()))
        transport.post_error("rank 1 failed on purpose")
        dist.barrier()
        transport.close()
        return 0, 0.0
    counting = _CountingStore(transport.store)
    polls = 0
    try:
        while True:
            transport.store = counting  # the polls' requests are counted ...
            transport.check_error()
            transport.store = counting.store  # ... the watch thread's are not
            polls += 1
            time.sleep(2e-5)
    except RemoteFailure:
        noticed = time.time()
    transport.store = counting.store
    posted = float(transport.store.get("dualpipe/poll-test/posted-at"))
    dist.barrier()
    transport.close()
    assert polls > 100, polls
    return counting.requests, noticed - posted


def waiting_part_polls_cheaply(rank: int, world: int, fresh: bool) -> dict[str, float]:
    """The overlap engine's waiter on a parted stage's all-to-all, with the pipeline's
    failure check (``check_error``, or ``check_error(fresh=True)`` when ``fresh``: every
    poll asks the store, the control).

    Rank 0 runs the stage part by part; rank 1 joins the first all-to-all 0.5 s late (so
    rank 0's waiter waits ~0.5 s) and, instead of joining the second, posts a failure
    0.5 s later, then joins it once rank 0 raised (so nothing is left in flight). Rank 0
    returns, for the first wait, the waiter's failure checks (``polls``), the store
    requests of every thread (the failure watch's included) and of the main thread (the
    waiter's), and its seconds; and the seconds from the failure to rank 0's waiter
    raising :class:`RemoteFailure`. Rank 1 returns ``{}``."""
    import time
    from collections.abc import Generator
    from datetime import timedelta
    from typing import Any

    import torch.distributed as dist

    from dualpipe.errors import RemoteFailure
    from dualpipe.overlap import AllToAll, ForwardTask, PartedStage, Waiter

    transport = Transport(None, [0, 1], rank, torch.device("cpu"), timeout=30.0)
    transport.key = f"dualpipe/wait-test-{fresh}"
    _start_watch(transport, rank)
    dist.barrier()
    store = transport.store
    assert store is not None
    if rank == 1:
        time.sleep(0.5)
        dist.all_to_all_single(torch.empty(4, 2), torch.ones(4, 2))  # the first, late
        time.sleep(0.5)
        store.set(f"{transport.key}/posted-at", str(time.time()))
        transport.post_error("rank 1 failed on purpose")
        transport.drain_failed_step(10.0)
        store.wait([f"{transport.key}/noticed"], timedelta(seconds=20))
        dist.all_to_all_single(torch.empty(4, 2), torch.ones(4, 2))  # the second
        dist.barrier()
        transport.close()
        return {}

    class TwoExchanges(PartedStage):
        def __init__(self) -> None:
            super().__init__()
            self.a2a = AllToAll(None)

        def parts(self, x: torch.Tensor) -> Generator[Any, Any, torch.Tensor]:
            y = yield self.a2a(x)
            z = yield self.a2a(2 * y)
            return z

    polls = [0]

    def check() -> None:
        polls[0] += 1
        transport.check_error(fresh=fresh)

    counting = _CountingStore(store)
    transport.store = counting  # every request from now on is counted, the watch's too
    task = ForwardTask(TwoExchanges(), (torch.ones(4, 2),), Waiter(timeout=20.0, check=check))
    task.step()  # part 0, then the first all-to-all
    start = time.perf_counter()
    task.step()  # waits ~0.5 s for it, runs part 1, launches the second
    first = {"polls": float(polls[0]), "requests": float(counting.requests),
             "main_requests": float(counting.main), "seconds": time.perf_counter() - start}
    try:
        task.step()  # waits for the second, which rank 1 never joins before failing
        raise AssertionError("the wait did not end in the peer's failure")
    except RemoteFailure as exc:
        noticed = time.time()
        assert "rank 1 failed on purpose" in str(exc), exc
    transport.store = store
    store.set(f"{transport.key}/noticed", "1")
    posted = float(store.get(f"{transport.key}/posted-at"))
    dist.barrier()  # after the second all-to-all (same group, issued in order)
    transport.close()
    return {**first, "delay": noticed - posted}
