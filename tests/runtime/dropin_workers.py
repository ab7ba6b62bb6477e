"""Spawned-rank functions for the drop-in tests: code written the way DeepSeek's DualPipe
examples call their library (module-level shape declaration, a custom linear that defers
its weight gradient through ``WeightGradStore``, ``run_backward`` inside a user's
``overlapped_forward_backward``, ``nn.Sequential`` of two stages, ``None`` inputs and
labels on ranks that take none, the original's ``rank_mapping``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dualpipe import (
    DualPipe,
    DualPipeV,
    PipelineError,
    set_p2p_tensor_dtype,
    set_p2p_tensor_shapes,
)
from dualpipe.utils import WeightGradStore, run_backward

MICRO, SEQ, HIDDEN = 2, 3, 8
COUNTS = {"put": 0, "deferred_ran": 0, "overlapped": 0, "run_backward": 0}


class DeferredLinearFn(torch.autograd.Function):
    """``x @ W.T`` whose weight gradient goes to the WeightGradStore when it is enabled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        deferred = WeightGradStore.enabled

        def weight_grad() -> None:
            if deferred:
                COUNTS["deferred_ran"] += 1
            weight.grad += grad_out.flatten(0, -2).T @ x.flatten(0, -2)

        if deferred:
            COUNTS["put"] += 1
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return grad_out @ weight, None


class DeferredLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DeferredLinearFn.apply(x, self.weight)


class Block(nn.Module):
    """One pipeline stage; pairs its forward and backward by hand like the original's
    example stage."""

    def __init__(self) -> None:
        super().__init__()
        self.up = DeferredLinear(HIDDEN, 2 * HIDDEN, bias=False)
        self.down = DeferredLinear(2 * HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    @classmethod
    def overlapped_forward_backward(
        cls,
        module0: Block,
        inputs0: list[torch.Tensor],
        criterion0: Callable[..., torch.Tensor] | None,
        labels0: list[torch.Tensor],
        module1: Block,
        loss1: torch.Tensor | None,
        outputs1: list[torch.Tensor],
        output_grads1: list[torch.Tensor],
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        COUNTS["overlapped"] += 1
        out = module0(*inputs0)
        outputs0 = [out] if isinstance(out, torch.Tensor) else list(out)
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            COUNTS["run_backward"] += 1
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _reference(
    model: nn.Sequential, x: torch.Tensor, labels: torch.Tensor, chunks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every micro-batch through the whole model on one process."""
    losses, outputs = [], []
    for xs, ls in zip(x.chunk(chunks), labels.chunk(chunks), strict=True):
        y = model(xs)
        loss = criterion(y, ls)
        loss.backward()
        losses.append(loss.detach())
        outputs.append(y.detach())
    return torch.stack(losses), torch.cat(outputs)


def _model(
    num_stages: int, chunks: int, seed: int
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The whole model and a batch of ``chunks`` micro-batches."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block() for _ in range(num_stages)])
    x = torch.randn(chunks * MICRO, SEQ, HIDDEN)
    labels = torch.randn(chunks * MICRO, SEQ, HIDDEN)
    return model, x, labels


def _local(model: nn.Sequential, a: int, b: int) -> nn.Sequential:
    """Fresh stages loaded from the reference's stages ``a`` and ``b`` (state_dict)."""
    local = nn.Sequential(Block(), Block())
    local[0].load_state_dict(model[a].state_dict())
    local[1].load_state_dict(model[b].state_dict())
    return local


def _grads_match(local: nn.Sequential, ref: list[nn.Module]) -> bool:
    for p, q in zip(local.parameters(), (q for m in ref for q in m.parameters()), strict=True):
        assert p.grad is not None and q.grad is not None
        assert p.grad.grad_fn is None, "a deferred weight gradient recorded autograd history"
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    return True


def dualpipev_case(group: dist.ProcessGroup, mapping: list[int] | None, seed: int) -> str:
    """The original DualPipeV example's checks on ``group``'s ranks."""
    size, group_rank = dist.get_world_size(group), dist.get_rank(group)
    rank = mapping[group_rank] if mapping is not None else group_rank  # pipeline rank
    chunks = 4 * size
    model, x, labels = _model(2 * size, chunks, seed)
    loss_ref, out_ref = _reference(model, x, labels, chunks)
    local = _local(model, rank, 2 * size - 1 - rank)
    pipe = DualPipeV(local, process_group=group, rank_mapping=mapping)
    assert pipe.executor.static_shapes, "module-level set_p2p_tensor_shapes was ignored"
    assert all(k.startswith(("module.0.", "module.1.")) for k in pipe.state_dict())
    inputs, targets = (x, labels) if rank == 0 else (None, None)

    loss, outputs = pipe.step(inputs, num_chunks=chunks, criterion=criterion, labels=(targets,))
    assert outputs is None
    if rank == 0:
        assert loss is not None and torch.equal(loss, loss_ref), (loss, loss_ref)
    else:
        assert loss is None
    _grads_match(local, [model[rank], model[2 * size - 1 - rank]])
    pipe.zero_grad()

    with torch.no_grad():
        loss, outputs = pipe.step(
            inputs, num_chunks=chunks, criterion=criterion, labels=(targets,),
            return_outputs=True,
        )
    if rank == 0:
        assert loss is not None and torch.equal(loss, loss_ref)
        assert isinstance(outputs, torch.Tensor) and torch.equal(outputs, out_ref)
    else:
        assert loss is None and outputs is None
    return f"dualpipev ranks={size} ok"


def dualpipe_case(group: dist.ProcessGroup, seed: int, sum_by_hand: bool) -> str:
    """The original DualPipe example's checks on ``group``'s ranks; with ``sum_by_hand``
    the port keeps the original's own summation of the two copies' gradients and turns
    the library's off (``sync_mirrored_grads=False``)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = 4 * size
    model, x, labels = _model(size, chunks, seed)
    loss_ref, out_ref = _reference(model, x, labels, chunks)
    local = _local(model, rank, size - 1 - rank)
    pipe = DualPipe(local, process_group=group, sync_mirrored_grads=not sum_by_hand)
    first, last = rank == 0, rank == size - 1
    if first:
        inputs, targets = x.chunk(2)[0], labels.chunk(2)[1]
    elif last:
        inputs, targets = x.chunk(2)[1], labels.chunk(2)[0]
    else:
        inputs, targets = None, None

    loss, outputs = pipe.step(inputs, num_chunks=chunks, criterion=criterion, labels=(targets,))
    assert outputs is None
    if first:
        assert loss is not None and torch.equal(loss, loss_ref.chunk(2)[1])
    elif last:
        assert loss is not None and torch.equal(loss, loss_ref.chunk(2)[0])
    else:
        assert loss is None
    if sum_by_hand:  # what the original's example does after its step
        for p0, p1 in zip(local[0].parameters(), local[1].parameters(), strict=True):
            assert p0.grad is not None and p1.grad is not None
            all0 = [torch.empty_like(p0) for _ in range(size)]  # gloo: a list, not a
            all1 = [torch.empty_like(p1) for _ in range(size)]  # stacked tensor
            dist.all_gather(all0, p0.grad, group=group)
            dist.all_gather(all1, p1.grad, group=group)
            p0.grad += all1[size - 1 - rank]
            p1.grad += all0[size - 1 - rank]
    _grads_match(local, [model[rank], model[size - 1 - rank]])
    pipe.zero_grad()

    with torch.no_grad():
        loss, outputs = pipe.step(
            inputs, num_chunks=chunks, criterion=criterion, labels=(targets,),
            return_outputs=True,
        )
    if first or last:
        half = 1 if first else 0
        assert loss is not None and torch.equal(loss, loss_ref.chunk(2)[half])
        assert isinstance(outputs, torch.Tensor)
        assert torch.equal(outputs, out_ref.chunk(2)[half])
    else:
        assert loss is None and outputs is None
    return f"dualpipe ranks={size}{' summed by hand' if sum_by_hand else ''} ok"


def label_free_criterion(group: dist.ProcessGroup) -> str:
    """A criterion that takes no labels: ``labels=()`` and ``labels=(None,)``."""
    chunks = 4
    model, x, _ = _model(2, chunks, seed=9)
    local = _local(model, 0, 1)
    pipe = DualPipeV(local, process_group=group)
    losses = []
    for labels, crit in (((), lambda y: y.square().mean()),
                         ((None,), lambda y, none: y.square().mean())):
        loss, _ = pipe.step(x, num_chunks=chunks, criterion=crit, labels=labels)
        losses.append(loss)
    expect = torch.stack([model(xs).square().mean() for xs in x.chunk(chunks)]).detach()
    assert all(loss is not None and torch.equal(loss, expect) for loss in losses)
    return "label-free criterion ok"


def all_cases(rank: int, world: int) -> dict[str, Any]:
    """On 4 processes: DualPipeV on 4 (with a rank_mapping), 3, 2 and 1 ranks, DualPipe on
    4 and 2 ranks (library summation and the original's hand summation), then a declared
    shape that is wrong."""
    assert world == 4
    set_p2p_tensor_shapes([(MICRO, SEQ, HIDDEN)])  # as the original examples do, first
    set_p2p_tensor_dtype(torch.float32)
    world_group = dist.group.WORLD
    report = [
        dualpipev_case(world_group, [1, 2, 3, 0], seed=1),
        dualpipe_case(world_group, seed=2, sum_by_hand=False),
    ]
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    if rank < 2:
        report.append(dualpipe_case(pairs[0], seed=3, sum_by_hand=True))
    else:
        report.append(dualpipev_case(pairs[1], None, seed=4))
    three, one = dist.new_group([0, 1, 2]), dist.new_group([3])
    if rank < 3:
        report.append(dualpipev_case(three, None, seed=5))
    else:
        report.append(dualpipev_case(one, None, seed=6))
    alone = [dist.new_group([r]) for r in range(world)]
    report.append(label_free_criterion(alone[rank]))
    counts = dict(COUNTS)
    deferred_left = len(WeightGradStore.cache)

    # a declaration the stages contradict: every rank fails with a clear message
    set_p2p_tensor_shapes([(MICRO, SEQ, HIDDEN + 1)])
    model, x, labels = _model(8, 8, seed=7)
    pipe = DualPipeV(_local(model, rank, 7 - rank))
    message = "no error"
    try:
        pipe.step(x if rank == 0 else None, num_chunks=8, criterion=criterion,
                  labels=(labels if rank == 0 else None,))
    except PipelineError as exc:
        message = str(exc)
        time.sleep(1.0)  # rank 0 hosts the store: let the others read the error first
    return {"report": report, "counts": counts, "left": deferred_left, "declared": message}
