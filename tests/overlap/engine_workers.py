"""Spawned-rank functions for the engine tests: two processes as an expert-parallel group."""

from __future__ import annotations

import copy
from collections.abc import Generator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dualpipe.overlap import ForwardTask, PartEvent, Waiter, run_backward, run_forward, run_pair

from .parted_models import DIM, MoEStage, expert_owner

TOKENS = 6


def _batch(shard: int, mb: int) -> Tensor:
    g = torch.Generator().manual_seed(100 * shard + mb)
    return torch.randn(TOKENS, DIM, generator=g)


def _loss(out: Tensor) -> Tensor:
    return out.square().mean()


def _grads(model: torch.nn.Module) -> dict[str, Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in model.named_parameters()}


def pair_vs_sequential(rank: int, world: int, ckpt: str | None, split: bool) -> dict[str, float]:
    """One F&B pair (forward of micro-batch 1, backward of micro-batch 0) interleaved vs
    the same parts run one after the other vs the un-parted model on one process."""
    torch.manual_seed(0)
    base = MoEStage(dist.group.WORLD, ep=world, ckpt=ckpt)
    x0, x1 = _batch(rank, 0), _batch(rank, 1)

    # sequential, part by part
    seq = copy.deepcopy(base)
    rec0 = run_forward(seq, (x0,))
    loss0_seq = _loss(rec0.outputs)
    run_backward(rec0, [loss0_seq], [None], split=False)
    loss1_seq = _loss(run_forward(seq, (x1,)).outputs)

    # interleaved pair
    ovl = copy.deepcopy(base)
    events: list[PartEvent] = []
    waiter = Waiter(timeout=60, events=events)
    rec0 = run_forward(ovl, (x0,), waiter)
    loss0 = _loss(rec0.outputs)
    from dualpipe.overlap import BackwardTask

    fwd = ForwardTask(ovl, (x1,), waiter)
    bwd = BackwardTask(rec0, [loss0], [None], waiter, split=split)
    run_pair(fwd, bwd)
    bwd.weight.run()
    loss1 = _loss(fwd.outputs)
    assert torch.equal(loss0, loss0_seq) and torch.equal(loss1, loss1_seq)
    g_seq, g_ovl = _grads(seq), _grads(ovl)
    for name, g in g_seq.items():
        if g is None:
            assert g_ovl[name] is None, name
        else:
            torch.testing.assert_close(g_ovl[name], g, rtol=1e-6, atol=1e-7, msg=name)
    # interleaving happened: the forward's first part ran before the backward's last part
    computes = [e.label for e in events if e.kind == "compute"]
    first_pair = computes.index("F part 0", computes.index("B part 3"))
    assert first_pair < computes.index("B part 0"), computes

    # the un-parted model on one process: own shard for shared parameters; every shard
    # for the experts this rank holds
    own, every = copy.deepcopy(base), copy.deepcopy(base)
    ref0 = _loss(own.local_forward(x0))
    ref0.backward()
    assert torch.equal(loss0, ref0), (loss0, ref0)
    assert torch.equal(loss1, _loss(own.local_forward(x1)))
    for shard in range(world):
        _loss(every.local_forward(_batch(shard, 0))).backward()
    g_own, g_every = _grads(own), _grads(every)
    for name, g in g_ovl.items():
        owner = expert_owner(name, base.local)
        want = g_own[name] if owner is None else (g_every[name] if owner == rank else None)
        if want is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=name)
    return {"events": float(len(events))}


def forward_only(rank: int, world: int) -> bool:
    """Under torch.no_grad() a parted forward runs part by part and matches the module."""
    torch.manual_seed(0)
    model = MoEStage(dist.group.WORLD, ep=world)
    x = _batch(rank, 0)
    with torch.no_grad():
        task = run_forward(model, (x,))
        plain = model(x)
        ref = model.local_forward(x)
    assert not task.outputs.requires_grad and not task.segments
    assert torch.equal(task.outputs, plain) and torch.equal(plain, ref)
    return True


def engine_cases(rank: int, world: int, cases: list[tuple[str | None, bool]]) -> int:
    """Run :func:`pair_vs_sequential` for each ``(ckpt, split)``, then :func:`forward_only`."""
    for ckpt, split in cases:
        pair_vs_sequential(rank, world, ckpt, split)
    forward_only(rank, world)
    return len(cases) + 1


class _Boom(MoEStage):
    """Raises in its second computation part on expert-parallel rank 1."""

    def parts(self, x: Tensor) -> Generator[Any, Any, Tensor]:
        gen = super().parts(x)
        value = None
        for part in range(10):
            if part == 1 and dist.get_rank() == 1:
                raise RuntimeError("boom")
            try:
                value = yield gen.send(value) if part else next(gen)
            except StopIteration as stop:
                return stop.value
        raise AssertionError("unreachable")


def peer_failure(rank: int, world: int) -> str:
    """One rank fails inside a part; the other one's wait ends in a clear, bounded error."""
    import time

    torch.manual_seed(0)
    model = _Boom(dist.group.WORLD, ep=world)
    waiter = Waiter(timeout=3)
    start = time.monotonic()
    try:
        run_forward(model, (_batch(rank, 0),), waiter)
    except (RuntimeError, TimeoutError) as exc:  # rank 1: its own error
        if rank == 1:
            time.sleep(5)  # stay alive: the peer must not rely on a closed connection
        return f"{type(exc).__name__}: {exc} after {time.monotonic() - start:.0f} s"
    return "finished"
