"""split: optimal balanced cuts, the right stages for every rank of each layout, stage
modules that compute what the layers compute and keep global layer names."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from dualpipe.schedules.registry import layout_for
from dualpipe.split import (
    StageModule,
    measure_layer_times,
    param_counts,
    partition,
    split_model,
    split_stages,
)


def _brute_force(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_partition_is_optimal_and_covers_every_layer_once() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [float(rng.choice([0, 1, 2, 3, 10, rng.randint(0, 50)])) for _ in range(n)]
        ranges = partition(costs, k)
        assert len(ranges) == k and all(len(r) > 0 for r in ranges)
        assert [i for r in ranges for i in r] == list(range(n))
        worst = max(sum(costs[i] for i in r) for r in ranges)
        assert worst == _brute_force(costs, k), (costs, k, ranges)


def test_partition_refuses_impossible_cuts() -> None:
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3"):
        partition([1.0, 1.0], 3)
    with pytest.raises(ValueError, match=">= 0"):
        partition([1.0, -1.0], 1)


def _gpt_like() -> list[nn.Module]:
    """A big embedding, six equal blocks, a big head."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(6)]
    return [nn.Embedding(100, 16), *blocks, nn.Linear(16, 100)]


def test_balance_by_parameters_beats_equal_layer_counts() -> None:
    layers = _gpt_like()
    counts = param_counts(layers)
    stages = split_stages(layers, 4)
    per_stage = [sum(counts[i] for i in s.layer_ids) for s in stages]
    # the optimum: embedding alone, head alone, the blocks in two halves
    assert [s.layer_ids for s in stages] == [(0,), (1, 2, 3), (4, 5, 6), (7,)]
    equal_counts = [sum(counts[i] for i in r) for r in (range(0, 2), range(2, 4),
                                                        range(4, 6), range(6, 8))]
    assert max(per_stage) < max(equal_counts)


def test_balance_by_given_costs() -> None:
    layers = [nn.Linear(4, 4) for _ in range(6)]
    stages = split_stages(layers, 3, costs=[5, 1, 1, 1, 1, 5])
    assert [s.layer_ids for s in stages] == [(0,), (1, 2, 3, 4), (5,)]
    with pytest.raises(ValueError, match="got 2 costs for 6 layers"):
        split_stages(layers, 3, costs=[1, 2])


@pytest.mark.parametrize("schedule,ranks", [("dualpipev", 4), ("dualpipe", 4), ("1f1b", 3),
                                            ("dualpipev", 1), ("zbv", 2),
                                            ("interleaved-1f1b", 2)])
def test_each_rank_gets_its_layout_stages(schedule: str, ranks: int) -> None:
    layers = [nn.Linear(4, 4) for _ in range(8)]
    layout = layout_for(schedule, ranks)
    held: list[int] = []
    for rank in range(ranks):
        mine = split_model(layers, schedule, rank=rank, num_ranks=ranks)
        assert tuple(m.stage for m in mine) == layout.rank_stages[rank]
        held += [i for m in mine for i in m.layer_ids]
    copies = 2 if schedule == "dualpipe" else 1  # DualPipe holds every stage twice
    assert sorted(held) == sorted(list(range(8)) * copies)


def test_dualpipev_and_dualpipe_put_first_and_last_layer_on_rank_0() -> None:
    """Why tied embedding / head weights just work with DualPipeV."""
    layers = _gpt_like()
    head = layers[-1]
    assert isinstance(head, nn.Linear)
    emb = layers[0]
    assert isinstance(emb, nn.Embedding)
    head.weight = emb.weight  # tie
    for schedule in ("dualpipev", "dualpipe"):
        first, last = split_model(layers, schedule, rank=0, num_ranks=2)
        assert first.layer_ids[0] == 0 and last.layer_ids[-1] == 7
        assert last[-1].weight is first[0].weight


def test_stage_module_runs_its_layers_and_keeps_global_names() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(5)])
    stages = split_stages(model, 2)
    x = torch.randn(3, 4)
    h = x
    for s in stages:
        h = s(h)
    assert torch.equal(h, model(x))
    keys = [k for s in stages for k in s.state_dict()]
    assert keys == list(model.state_dict())  # "3.0.weight" wherever layer 3 lands


def test_stage_module_passes_tuples_between_layers() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return x * mask + 1, mask

    stage = StageModule(0, [(0, Pair()), (1, Pair())])
    x, mask = torch.ones(2), torch.tensor([1.0, 0.0])
    out, m = stage(x, mask)
    assert torch.equal(out, torch.tensor([3.0, 1.0])) and m is mask


def test_measure_layer_times_leaves_gradients_alone() -> None:
    layers = [nn.Linear(8, 8), nn.Linear(8, 64), nn.Linear(64, 8)]
    layers[0].weight.grad = torch.ones(8, 8)
    times = measure_layer_times(layers, torch.randn(4, 8), repeats=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert torch.equal(layers[0].weight.grad, torch.ones(8, 8))
    assert layers[1].weight.grad is None
    assert split_stages(layers, 2, costs=times)[0].layer_ids[0] == 0
