"""Per-part costs: the pair's interleaved time, and the simulator using it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpipe import Costs, generate, simulate
from dualpipe.partcosts import PartCosts, pair_intervals, parse_parts
from dualpipe.schedules.actions import Action, Op, Overlap
from dualpipe.simulation import step_duration


def test_balanced_parts_hide_all_communication() -> None:
    c = parse_parts("2,2,2,2,2", "2,2,2,2,2", "1,1,1")
    assert (c.forward, c.backward, c.weight) == (10, 13, 3)
    assert c.pair() == 15  # every compute second back to back: sum(f) + sum(b) + sum(w)
    assert c.pair(full_backward=False) == 12


def test_long_communication_is_exposed() -> None:
    c = parse_parts("1,5,1", "1,5,1", "0,0")
    # B1, F0 (0-2); B1> 1-6, F0> 6-11 on one link; B0 at 6-7, F1 at 11-12
    assert c.pair() == 12


def test_no_communication_is_sequential() -> None:
    c = parse_parts("3", "2", "1")
    assert c.pair() == 6 and c.pair(full_backward=False) == 5


def test_bad_part_costs() -> None:
    with pytest.raises(ValueError, match="odd count"):
        parse_parts("1,1", "1", "1")
    with pytest.raises(ValueError, match="w needs 2"):
        parse_parts("1,1,1", "1,1,1", "1")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_parts("a", "1", "1")
    with pytest.raises(ValueError, match=">= 0"):
        PartCosts((1.0,), (), (-1.0,), (0.0,), ())


def test_costs_from_parts_drive_the_simulator() -> None:
    parts = parse_parts("2,2,2,2,2", "2,2,2,2,2", "1,1,1")
    costs = Costs(parts=parts, f=99)  # f, b, w come from the parts
    assert (costs.f, costs.b, costs.w, costs.pair, costs.pair_input) == (10, 13, 3, 15, 12)
    f, b = Action(Op.FORWARD, 0, 1), Action(Op.BACKWARD, 1, 0)
    i = Action(Op.INPUT, 1, 0)
    assert step_duration(Overlap(f, b), costs) == 15
    assert step_duration(Overlap(f, i), costs) == 12
    schedule = generate("dualpipev", 2, 10)
    overlapped = simulate(schedule, costs).makespan
    sequential = simulate(schedule, Costs(f=10, b=13, w=3)).makespan
    assert overlapped < sequential
    with pytest.raises(ValueError, match="fb or parts"):
        Costs(parts=parts, fb=3)



@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.data())
def test_pair_respects_resources_and_dependencies(n: int, data: st.DataObject) -> None:
    def draw(k: int) -> tuple[float, ...]:
        return tuple(data.draw(st.lists(st.floats(0, 5), min_size=k, max_size=k)))

    c = PartCosts(draw(n), draw(n - 1), draw(n), draw(n), draw(n - 1))
    for full in (True, False):
        ivs = pair_intervals(c, full)
        at = {iv.label: iv for iv in ivs}
        for row in ("compute", "comm"):
            spans = sorted((iv.start, iv.end) for iv in ivs if iv.resource == row)
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:], strict=False))
        for k in range(n - 1):
            assert at[f"F{k}>"].start >= at[f"F{k}"].end - 1e-9
            assert at[f"F{k + 1}"].start >= at[f"F{k}>"].end - 1e-9
            assert at[f"B{k + 1}>"].start >= at[f"B{k + 1}"].end - 1e-9
            assert at[f"B{k}"].start >= at[f"B{k + 1}>"].end - 1e-9
        assert (sum(iv.label.startswith("W") for iv in ivs) == n) == full
        busy = sum(iv.end - iv.start for iv in ivs if iv.resource == "compute")
        assert c.pair(full) >= busy - 1e-9
        assert c.pair(full) <= c.forward + c.backward - (0 if full else c.weight) + 1e-9
