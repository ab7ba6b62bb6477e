"""Message latency read back from a timeline: exactly the simulator's comm."""

from __future__ import annotations

import pytest

from dualpipe.autoschedule import message_latency
from dualpipe.schedules import generate
from dualpipe.simulation import Costs, simulate


@pytest.mark.parametrize("comm", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("name", ["dualpipev", "dualpipe", "1f1b"])
def test_latency_of_a_simulated_timeline_is_comm(name: str, comm: float) -> None:
    schedule = generate(name, 4, 8)
    timeline = simulate(schedule, Costs(f=1, b=2, w=1, fb=2.5, comm=comm)).timeline
    assert message_latency(schedule, timeline) == pytest.approx(comm)
