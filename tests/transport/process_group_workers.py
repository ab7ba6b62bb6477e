"""Spawned-rank functions for the transport tests."""

from __future__ import annotations

import gc
import weakref

import torch

from dualpipe.transport.process_group import Transport


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
    """Wraps the process group's store and counts the requests made through it."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self.store, self.requests = store, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.requests += 1
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
    transport.begin_step(1)
    # one message each way starts the failure watch (it starts with the first message)
    if rank == 0:
        transport.send([torch.ones(4)], 1, 0)
        transport.wait(transport.recv([torch.zeros(4)], 1, 1), "a message")
    else:
        buf = torch.zeros(4)
        transport.wait(transport.recv([buf], 0, 0), "a message")
        transport.send([buf], 0, 1)
    transport.drain_sends("sends")
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
