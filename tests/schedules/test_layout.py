"""Layouts: where each stage of each path lives (docs/schedules.md, DualPipe and DualPipeV)."""

from __future__ import annotations

import pytest

from dualpipe.schedules import (
    Layout,
    dualpipe_layout,
    dualpipev_layout,
    layout_for,
    linear_layout,
)


def test_dualpipe_four_ranks_as_documented() -> None:
    layout = dualpipe_layout(4)
    # down: S0@r0.p0 -> S1@r1.p0 -> S2@r2.p1 -> S3@r3.p1
    # up:   S0@r3.p0 -> S1@r2.p0 -> S2@r1.p1 -> S3@r0.p1
    assert layout.paths == (
        ((0, 0), (1, 0), (2, 1), (3, 1)),
        ((3, 0), (2, 0), (1, 1), (0, 1)),
    )
    assert layout.stages == ((0, 1, 2, 3), (0, 1, 2, 3))
    assert layout.rank_stages == ((0, 3), (1, 2), (2, 1), (3, 0))
    assert (layout.num_streams, layout.num_stages, layout.num_phases) == (2, 4, 2)


@pytest.mark.parametrize("n", [2, 4, 6, 8, 16])
def test_dualpipe_layout_matches_the_definition(n: int) -> None:
    layout = dualpipe_layout(n)
    half = n // 2
    for r in range(n):
        # rank r holds S_r and S_{N-1-r}; down micro-batches use S_r, up ones S_{N-1-r}
        assert set(layout.rank_stages[r]) == {r, n - 1 - r}
        down_phase = 0 if r < half else 1  # phase 0: r sits in the first half of the path
        up_phase = 1 - down_phase
        assert layout.locate(r, down_phase) == (0, r)
        assert layout.locate(r, up_phase) == (1, n - 1 - r)
        assert layout.stage(r, down_phase) == r
        assert layout.stage(r, up_phase) == n - 1 - r
        assert layout.rank_stages[r][layout.module_index(r, down_phase)] == r
        # phase 0 is always the first half of its path
        assert layout.locate(r, 0)[1] < half <= layout.locate(r, 1)[1]
    assert layout.is_first(0, 0) and layout.is_first(n - 1, 0)
    assert layout.is_last(n - 1, 1) and layout.is_last(0, 1)
    assert layout.next(0, 1) is None and layout.prev(0, 0) is None


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_dualpipev_layout_is_a_v(n: int) -> None:
    layout = dualpipev_layout(n)
    path = layout.paths[0]
    assert layout.num_streams == 1 and layout.num_stages == 2 * n and layout.num_phases == 2
    assert path == tuple((r, 0) for r in range(n)) + tuple((r, 1) for r in reversed(range(n)))
    for r in range(n):
        assert layout.stage(r, 0) == r
        assert layout.stage(r, 1) == 2 * n - 1 - r
        assert layout.rank_stages[r] == (r, 2 * n - 1 - r)
    # the turn: S_{N-1} and S_N are both on rank N-1
    assert layout.next(n - 1, 0) == (n - 1, 1)
    assert layout.prev(n - 1, 1) == (n - 1, 0)
    assert layout.is_first(0, 0) and layout.is_last(0, 1)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_linear_layout(n: int) -> None:
    layout = linear_layout(n)
    assert layout.paths == (tuple((r, 0) for r in range(n)),)
    assert layout.rank_stages == tuple((r,) for r in range(n))
    assert layout.num_phases == 1 and layout.num_stages == n
    for r in range(n):
        assert not layout.has(r, 1)
        assert layout.next(r, 0) == ((r + 1, 0) if r + 1 < n else None)
        assert layout.prev(r, 0) == ((r - 1, 0) if r > 0 else None)
        assert layout.module_index(r, 0) == 0


def test_layout_for_names() -> None:
    assert layout_for("dualpipe", 4) == dualpipe_layout(4)
    assert layout_for("dualpipev", 3) == dualpipev_layout(3)
    for name in ("1f1b", "zb1p", "gpipe"):
        assert layout_for(name, 3) == linear_layout(3)


@pytest.mark.parametrize("n", [0, 1, 3, -2])
def test_dualpipe_layout_needs_even_ranks(n: int) -> None:
    with pytest.raises(ValueError, match="even number of ranks"):
        dualpipe_layout(n)


def test_other_layouts_need_a_rank() -> None:
    with pytest.raises(ValueError, match="at least 1 rank"):
        dualpipev_layout(0)
    with pytest.raises(ValueError, match="at least 1 rank"):
        linear_layout(0)


def test_unknown_positions_raise() -> None:
    layout = dualpipe_layout(2)
    with pytest.raises(ValueError, match="rank 0 has no phase 2"):
        layout.locate(0, 2)
    assert not layout.has(2, 0)


def test_layout_rejects_inconsistent_placements() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        Layout(1, (((0, 0), (0, 0)),), ((0, 1),), ((0, 1),))
    with pytest.raises(ValueError, match="out of range"):
        Layout(1, (((0, 0), (1, 0)),), ((0, 1),), ((0,), (1,)))
    with pytest.raises(ValueError, match="one stage id per position"):
        Layout(2, (((0, 0), (1, 0)),), ((0,),), ((0,), (1,)))


def test_where_streams_enter_and_leave() -> None:
    layout = dualpipe_layout(4)
    assert (layout.entry(0), layout.exit(0)) == ((0, 0), (3, 1))
    assert (layout.entry(1), layout.exit(1)) == ((3, 0), (0, 1))
    assert layout.streams_starting_on(0) == (0,) and layout.streams_ending_on(0) == (1,)
    assert layout.streams_starting_on(1) == () and layout.streams_ending_on(2) == ()
    v = dualpipev_layout(3)
    assert v.entry(0) == (0, 0) and v.exit(0) == (0, 1)
    assert v.streams_starting_on(0) == v.streams_ending_on(0) == (0,)
    line = linear_layout(3)
    assert line.streams_starting_on(0) == (0,) and line.streams_ending_on(2) == (0,)
