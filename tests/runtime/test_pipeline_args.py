"""How a pipeline reads the original's constructor arguments (no processes needed)."""

from __future__ import annotations

import pytest
from torch import nn

from dualpipe.runtime.pipeline import _pipeline_to_group, _stage_modules


def test_modules_may_be_any_iterable_of_stages() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    assert _stage_modules((a, b), 2) == [a, b]
    assert _stage_modules(nn.Sequential(a, b), 2) == [a, b]
    assert _stage_modules(nn.ModuleList([a, b]), 2) == [a, b]
    assert _stage_modules(iter([a, b]), 2) == [a, b]
    whole = nn.Sequential(a, b)
    assert _stage_modules(whole, 1) == [whole]  # one stage expected: the Sequential is it
    assert _stage_modules(nn.ModuleList([a]), 1) == [a]
    assert _stage_modules(a, 2) == [a]  # then refused for its count by the pipeline
    with pytest.raises(TypeError, match=r"modules\[1\] must be an nn.Module, got int"):
        _stage_modules([a, 3], 2)  # type: ignore[list-item]


def test_rank_mapping_is_group_rank_to_pipeline_rank() -> None:
    # process g acts as pipeline rank mapping[g]: pipeline rank 0 is process 3
    assert _pipeline_to_group([1, 2, 3, 0], 4) == [3, 0, 1, 2]
    assert _pipeline_to_group(None, 3) == [0, 1, 2]
    for bad in ([0, 0], [0, 1, 2], [1, 2]):
        with pytest.raises(ValueError, match="must be a permutation of 0..1"):
            _pipeline_to_group(bad, 2)
