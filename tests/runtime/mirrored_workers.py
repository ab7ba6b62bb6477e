"""Spawned-rank functions for the mirrored-stage tests (DualPipe on 2 ranks)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dualpipe.errors import PipelineError
from dualpipe.runtime.pipeline import DualPipe, Pipeline

from .models import DIM, MLPStage, criterion

CHUNKS = 4  # micro-batches per step (2 per direction)


class PartlyFrozenStage(MLPStage):
    """An MLP stage with a frozen bias that is used and a trainable one that is not."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Parameter(torch.full((DIM,), 1.0), requires_grad=False)
        self.unused = nn.Parameter(torch.full((DIM,), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.frozen


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, DIM, generator=g), torch.randn(8, DIM, generator=g)


def _reference(stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> None:
    """Both directions through the whole model on one process: the first half of the
    batch enters stage 0 ... and is scored against the first half of the labels."""
    for xs, ys in zip(x.tensor_split(CHUNKS), y.tensor_split(CHUNKS), strict=True):
        h = xs
        for stage in stages:
            h = stage(h)
        criterion(h, ys).backward()


def _step(pipe: Pipeline, rank: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """DualPipe on 2 ranks: rank 0 feeds the first half and scores the second half's
    outputs; rank 1 the other way round."""
    first, second = slice(0, 4), slice(4, 8)
    mine, theirs = (first, second) if rank == 0 else (second, first)
    pipe.step(x[mine], num_chunks=CHUNKS, criterion=criterion, labels=(y[theirs],))


def _local(stages: list[nn.Module], rank: int) -> list[nn.Module]:
    return [copy.deepcopy(stages[rank]), copy.deepcopy(stages[1 - rank])]


def frozen_and_accumulated(rank: int, world: int) -> dict[str, object]:
    """Frozen and unused parameters get no gradient and do not move under AdamW's weight
    decay; other gradients are summed into the existing ``.grad`` tensors in place."""
    torch.manual_seed(0)
    stages: list[nn.Module] = [PartlyFrozenStage(), PartlyFrozenStage()]
    ref = copy.deepcopy(stages)
    mods = _local(stages, rank)
    pipe = DualPipe(mods, timeout=30.0)
    x, y = _data(1)
    _step(pipe, rank, x, y)
    _reference(ref, x, y)
    out: dict[str, object] = {}
    params = dict(pipe.named_parameters())
    out["no_grad_for_frozen_or_unused"] = all(
        params[f"module.{i}.{n}"].grad is None for i in (0, 1) for n in ("frozen", "unused")
    )
    for i, k in enumerate((rank, 1 - rank)):
        for (name, p), q in zip(mods[i].named_parameters(), ref[k].parameters(), strict=True):
            if p.requires_grad and name != "unused":
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)

    # a second step without zero_grad: accumulated into the very same tensors
    held = {n: p.grad for n, p in params.items() if p.grad is not None}
    first = {n: g.clone() for n, g in held.items()}
    exchanges: list[int] = []
    swap = pipe.transport.exchange

    def counted(tensor: torch.Tensor, *args: object) -> torch.Tensor:
        exchanges.append(tensor.numel())
        return swap(tensor, *args)  # type: ignore[arg-type]

    pipe.transport.exchange = counted  # type: ignore[method-assign]
    _step(pipe, rank, x, y)
    pipe.transport.exchange = swap  # type: ignore[method-assign]
    trainable = sum(p.numel() for p in pipe.parameters() if p.requires_grad)
    # one message: a requires-grad and a has-grad flag per tensor, then the gradients of
    # every trainable parameter of this rank's two modules
    out["one_exchange"] = exchanges == [2 * len(params) + trainable]
    out["same_grad_tensors"] = all(params[n].grad is g for n, g in held.items())
    out["accumulated"] = all(torch.equal(params[n].grad, 2 * first[n]) for n in held)

    # AdamW with weight decay: the frozen and unused weights stay where they were
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        _step(pipe, rank, x, y)
        opt.step()
    out["frozen_kept"] = all(
        torch.equal(params[f"module.{i}.{n}"], torch.ones(DIM))
        for i in (0, 1)
        for n in ("frozen", "unused")
    )
    # the two copies of each stage are still identical after the optimizer steps
    flat = torch.cat([p.detach().reshape(-1) for m in mods for p in m.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    n0 = sum(p.numel() for p in mods[0].parameters())
    peer = gathered[1 - rank]
    out["copies_equal"] = torch.equal(flat[:n0], peer[n0:]) and torch.equal(flat[n0:], peer[:n0])
    out["trained"] = not torch.equal(flat, _initial(stages, rank))
    return out


def _initial(stages: list[nn.Module], rank: int) -> torch.Tensor:
    mods = _local(stages, rank)
    return torch.cat([p.detach().reshape(-1) for m in mods for p in m.parameters()])


def construction_errors(rank: int, world: int) -> list[str]:
    """A parameter frozen on one copy only, and a rank_mapping that is not a permutation,
    are refused at construction with clear errors."""
    messages = []
    torch.manual_seed(0)
    a, b = MLPStage(), MLPStage()
    if rank == 0:
        a.net[0].weight.requires_grad_(False)  # rank 1's copy of this stage is its b
    try:
        DualPipe([a, b], timeout=20.0, mirrored_weights="sync")
        messages.append("accepted")
    except ValueError as exc:
        messages.append(str(exc))
    try:
        DualPipe([MLPStage(), MLPStage()], rank_mapping=[0, 0], timeout=20.0)
        messages.append("accepted")
    except ValueError as exc:
        messages.append(str(exc))
    return messages


def state_dict_keys(rank: int, world: int) -> tuple[list[str], bool]:
    """``module.0.*`` / ``module.1.*`` keys as in the original; an old ``module_list.*``
    checkpoint still loads."""
    torch.manual_seed(0)
    stages = [MLPStage(), MLPStage()]
    pipe = DualPipe(_local(stages, rank), timeout=20.0)
    keys = sorted(pipe.state_dict())
    torch.manual_seed(1)
    other = DualPipe(_local([MLPStage(), MLPStage()], rank), timeout=20.0)
    old = {k.replace("module.", "module_list.", 1): v for k, v in pipe.state_dict().items()}
    other.load_state_dict(old)
    same = all(
        torch.equal(p, q) for p, q in zip(pipe.parameters(), other.parameters(), strict=True)
    )
    return keys, same


def requires_grad_changed(rank: int, world: int) -> tuple[bool, bool, str]:
    """``requires_grad`` changed on both copies after construction is followed (an
    unfrozen parameter is summed from then on, a newly frozen one is left alone);
    changed on one copy only, it is a clear error on both ranks."""
    torch.manual_seed(0)
    stages: list[nn.Module] = [PartlyFrozenStage(), PartlyFrozenStage()]
    mods = _local(stages, rank)
    pipe = DualPipe(mods, timeout=30.0)
    for m in mods:
        m.frozen.requires_grad_(True)
        m.net[0].weight.requires_grad_(False)
    ref = copy.deepcopy(stages)
    for m in ref:
        m.frozen.requires_grad_(True)
        m.net[0].weight.requires_grad_(False)
    x, y = _data(2)
    _step(pipe, rank, x, y)
    _reference(ref, x, y)
    unfrozen = all(
        m.frozen.grad is not None
        and torch.allclose(m.frozen.grad, ref[k].frozen.grad, rtol=1e-5, atol=1e-6)
        for m, k in zip(mods, (rank, 1 - rank), strict=True)
    )
    frozen = all(m.net[0].weight.grad is None for m in mods)
    if rank == 1:
        mods[0].net[2].weight.requires_grad_(False)  # one copy only
    message = "no error"
    try:
        _step(pipe, rank, x, y)
    except PipelineError as exc:
        message = str(exc)
    return unfrozen, frozen, message


def all_cases(rank: int, world: int) -> dict[str, object]:
    """Every case above in one run of spawned processes."""
    out = frozen_and_accumulated(rank, world)
    out["changed"] = requires_grad_changed(rank, world)
    out["errors"] = construction_errors(rank, world)
    out["keys"], out["old_checkpoint_loads"] = state_dict_keys(rank, world)
    out["tied"] = tied_embedding_head(rank, world)
    return out


VOCAB = 11


class TiedEmbedding(nn.Module):
    """Stage 0 of a tied model: token ids -> mean embedding -> MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mlp = MLPStage()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids).mean(dim=1))


class TiedHead(nn.Module):
    """The last stage: MLP -> logits through the embedding's weight (tied)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.mlp = MLPStage()
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(x))


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


def tied_embedding_head(rank: int, world: int) -> dict[str, object]:
    """DualPipe with the embedding of stage 0 tied to the head of the last stage (both on
    each rank): every gradient equals one process (relative norm <= 1e-5), the tied weight
    once, and both ranks' copies hold the same gradient and, after AdamW steps, the same
    weights."""
    torch.manual_seed(0)
    first = TiedEmbedding()
    stages: list[nn.Module] = [first, TiedHead(first.emb)]
    ref = copy.deepcopy(stages)  # keeps the tie
    pair = copy.deepcopy(stages)
    mods = [pair[rank], pair[1 - rank]]
    emb, head = (mods[0], mods[1]) if rank == 0 else (mods[1], mods[0])
    assert emb.emb.weight is head.head.weight  # tied on this rank too
    pipe = DualPipe(mods, timeout=30.0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (8, 3), generator=g)
    target = torch.randint(0, VOCAB, (8,), generator=g)
    half = slice(0, 4) if rank == 0 else slice(4, 8)
    other = slice(4, 8) if rank == 0 else slice(0, 4)
    pipe.step(ids[half], num_chunks=CHUNKS, criterion=_cross_entropy, labels=(target[other],))
    for xs, ys in zip(ids.tensor_split(CHUNKS), target.tensor_split(CHUNKS), strict=True):
        _cross_entropy(ref[1](ref[0](xs)), ys).backward()
    worst = 0.0
    for i, k in enumerate((rank, 1 - rank)):
        for (name, p), q in zip(mods[i].named_parameters(), ref[k].parameters(), strict=True):
            assert p.grad is not None and q.grad is not None, name
            rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
            worst = max(worst, rel)
    tied = emb.emb.weight
    expect = ref[0].emb.weight.grad
    assert expect is not None and tied.grad is not None
    tied_rel = ((tied.grad - expect).norm() / expect.norm()).item()
    grads = [torch.empty_like(tied.grad) for _ in range(world)]
    torch.distributed.all_gather(grads, tied.grad.contiguous())
    opt = torch.optim.AdamW(pipe.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        pipe.step(ids[half], num_chunks=CHUNKS, criterion=_cross_entropy,
                  labels=(target[other],))
    weights = [torch.empty_like(tied) for _ in range(world)]
    torch.distributed.all_gather(weights, tied.detach().contiguous())
    return {
        "worst": worst,
        "tied_rel": tied_rel,
        "grads_equal": torch.equal(grads[0], grads[1]),
        "weights_equal": torch.equal(weights[0], weights[1]),
    }
