"""The demo's GPT, its split into pipeline stages, and the copy task."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dualpipe.demo.model import (
    Embed,
    GPTConfig,
    GPTStage,
    Head,
    build_gpt,
    gpt_stages,
    split_gpt,
    stage_sizes,
)
from dualpipe.demo.task import IGNORE, SEP, CopyTask, lm_loss

CONFIG = GPTConfig(vocab_size=16, seq_len=23, dim=32, n_head=4, n_layer=6)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: one intra-op thread is fastest, and on a busy 2-core
    machine a thread pool is many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compose(stages: list[GPTStage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x)
    return x


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4, 5, 8])
def test_stages_compose_to_exactly_the_full_model(num_stages: int) -> None:
    ids = torch.randint(0, CONFIG.vocab_size, (5, CONFIG.seq_len),
                        generator=torch.Generator().manual_seed(7))
    full = build_gpt(CONFIG, seed=3)
    expected = full(ids)
    stages = gpt_stages(CONFIG, num_stages, seed=3)
    assert len(stages) == num_stages
    assert torch.equal(_compose(stages, ids), expected)
    copies = split_gpt(full, num_stages)  # deep copies of the same modules
    assert torch.equal(_compose(copies, ids), expected)
    # every piece lands in exactly one stage, in order
    assert sum(len(s.pieces) for s in stages) == CONFIG.n_layer + 2
    assert stages[0].first and isinstance(stages[0].pieces[0], Embed)
    assert stages[-1].last and isinstance(stages[-1].pieces[-1], Head)
    assert not any(s.first for s in stages[1:]) and not any(s.last for s in stages[:-1])
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(
        p.numel() for p in full.parameters()
    )


def test_stages_compose_on_shorter_sequences_and_backward_matches() -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=gen)
    targets = torch.randint(0, CONFIG.vocab_size, (3, 9), generator=gen)
    full = build_gpt(CONFIG, seed=0)
    stages = split_gpt(full, 4)
    lm_loss(full(ids), targets).backward()
    lm_loss(_compose(stages, ids), targets).backward()
    split_grads = [p.grad for s in stages for p in s.parameters()]
    for p, g in zip(full.parameters(), split_grads, strict=True):
        assert g is not None and torch.equal(p.grad, g)


def test_weights_depend_only_on_the_seed() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    a, b, c = build_gpt(CONFIG, seed=5), build_gpt(CONFIG, seed=5), build_gpt(CONFIG, seed=6)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)  # the global random state is untouched
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_split_copies_do_not_share_weights_unless_asked() -> None:
    full = build_gpt(CONFIG, seed=0)
    copies = split_gpt(full, 3)
    shared = split_gpt(full, 3, share=True)
    with torch.no_grad():
        next(copies[0].parameters()).add_(1.0)
    assert not torch.equal(next(copies[0].parameters()), full.embed.tok.weight)
    assert next(shared[0].parameters()) is full.embed.tok.weight


def test_stage_sizes() -> None:
    assert stage_sizes(8, 8) == [1] * 8
    assert stage_sizes(8, 4) == [2, 2, 2, 2]
    assert stage_sizes(8, 3) == [3, 3, 2]  # extras: inner stages, then the embedding's
    assert stage_sizes(10, 4) == [2, 3, 3, 2]
    assert stage_sizes(9, 1) == [9]
    assert stage_sizes(5, 2) == [3, 2]
    for pieces in range(1, 12):
        for stages in range(1, pieces + 1):
            sizes = stage_sizes(pieces, stages)
            assert sum(sizes) == pieces and min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="n_layer >= 7"):
        stage_sizes(8, 9)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(dim=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)


def test_task_is_deterministic_and_well_formed() -> None:
    task = CopyTask(vocab_size=16, prefix_len=5)
    tokens, targets = task.batch(6, seed=1, step=4)
    again = task.batch(6, seed=1, step=4)
    assert torch.equal(tokens, again[0]) and torch.equal(targets, again[1])
    other_step, other_seed = task.batch(6, seed=1, step=5), task.batch(6, seed=2, step=4)
    assert not torch.equal(tokens, other_step[0]) and not torch.equal(tokens, other_seed[0])
    assert tokens.shape == targets.shape == (6, task.seq_len) == (6, 11)
    assert tokens.dtype == targets.dtype == torch.int64
    k = task.prefix_len
    prefix = tokens[:, :k]
    assert bool(((prefix >= 2) & (prefix < 16)).all())
    assert bool((tokens[:, k] == SEP).all())
    assert torch.equal(tokens[:, k + 1 :], prefix)
    # only the copied symbols count: predicted from the separator and the copy so far
    assert bool((targets[:, :k] == IGNORE).all()) and bool((targets[:, 2 * k :] == IGNORE).all())
    assert torch.equal(targets[:, k : 2 * k], prefix)
    with pytest.raises(ValueError):
        task.batch(0, seed=0, step=0)


def _adam_step(params: list[torch.nn.Parameter], state: list[torch.Tensor], t: int,
               lr: float) -> None:
    """Plain Adam, written out: ``torch.optim`` would import torch._dynamo (seconds)."""
    with torch.no_grad():
        for p, m, v in zip(params, state[0::2], state[1::2], strict=True):
            assert p.grad is not None
            m.mul_(0.9).add_(p.grad, alpha=0.1)
            v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
            p -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)


def test_a_few_steps_of_the_full_model_lower_the_loss() -> None:
    task = CopyTask(vocab_size=6, prefix_len=3)  # small enough to learn in 40 steps
    config = GPTConfig(vocab_size=task.vocab_size, seq_len=task.seq_len, dim=32, n_layer=1)
    model = build_gpt(config, seed=0)
    params = list(model.parameters())
    state = [torch.zeros_like(p) for p in params for _ in range(2)]
    losses = []
    for step in range(40):
        tokens, targets = task.batch(32, seed=0, step=step)
        loss = lm_loss(model(tokens), targets)
        model.zero_grad()
        loss.backward()
        _adam_step(params, state, step + 1, lr=1e-2)
        losses.append(loss.item())
    assert losses[0] > task.chance_loss  # untrained: no better than guessing a symbol
    assert max(losses[-5:]) < 0.25 * task.chance_loss  # it copies now
