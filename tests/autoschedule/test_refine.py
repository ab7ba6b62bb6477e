"""Local search: never worse, valid, within the limit; it finds an obvious improvement."""

from __future__ import annotations

import pytest

from dualpipe.autoschedule import refine
from dualpipe.autoschedule.refine import compile_schedule, evaluate
from dualpipe.schedules import Schedule, generate, linear_layout, validate
from dualpipe.simulation import Costs, simulate


@pytest.mark.parametrize("name", ["dualpipev", "dualpipe", "1f1b", "zb1p", "gpipe"])
def test_fast_evaluation_equals_the_simulator(name: str) -> None:
    costs = Costs(f=1.5, b=2.5, w=0.7, fb=3.1, comm=0.3)
    schedule = generate(name, 4, 8)
    ev = evaluate(compile_schedule(schedule, costs))
    assert ev is not None
    assert ev.makespan == pytest.approx(simulate(schedule, costs).makespan)


def test_deadlock_is_detected() -> None:
    text = "rank 0: F0.0 I0.0 W0.0\nrank 1: I0.0 F0.0 W0.0"  # I before its own F
    schedule = Schedule.from_text(text, linear_layout(2))
    assert evaluate(compile_schedule(schedule, Costs())) is None


def test_moves_a_weight_gradient_off_the_critical_path() -> None:
    # rank 1 runs W0.0 before F0.1, so rank 0's I0.1 waits one W longer than it must
    text = "rank 0: F0.0 F0.1 I0.0 I0.1 W0.0 W0.1\nrank 1: F0.0 I0.0 W0.0 F0.1 I0.1 W0.1"
    schedule = Schedule.from_text(text, linear_layout(2))
    costs = Costs(f=1, b=2, w=1)
    before = simulate(schedule, costs).makespan
    better, makespan = refine(schedule, costs, limit=2, max_evals=100)
    validate(better)
    assert makespan == pytest.approx(simulate(better, costs).makespan)
    assert makespan < before


@pytest.mark.parametrize("limit", [9, 10])
def test_never_worse_and_within_limit(limit: int) -> None:
    costs = Costs(f=1, b=2, w=1, fb=2.2, comm=0.2)
    for name in ("dualpipev",):
        schedule = generate(name, 4, 10)
        better, makespan = refine(schedule, costs, limit, max_evals=200)
        validate(better)
        result = simulate(better, costs)
        assert result.makespan == pytest.approx(makespan)
        assert makespan <= simulate(schedule, costs).makespan + 1e-9
        assert max(result.peak_activations) <= limit
