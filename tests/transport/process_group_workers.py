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
