"""The runtime trains an auto schedule exactly, and a measured step gives search costs."""

from __future__ import annotations

from dualpipe.autoschedule import search
from dualpipe.schedules import Op, Overlap, generate
from dualpipe.simulation import Costs
from dualpipe.testing import run_distributed

from .auto_workers import train_auto_schedule


def test_auto_schedule_trains_exactly() -> None:
    found = search(2, 5, Costs(f=1, b=2, w=1, fb=2.2, comm=0.3))
    schedule = found.schedule
    assert schedule.to_text() != generate("dualpipev", 2, 5).to_text()
    # it pairs, and defers weight gradients
    assert any(isinstance(s, Overlap) for row in schedule.steps for s in row)
    assert any(a.op is Op.WEIGHT for r in range(2) for a in schedule.actions(r))
    kinds = ["mlp", "traps"]
    results = run_distributed(train_auto_schedule, 2, schedule.to_dict(), kinds, timeout=120)
    assert results[1] == [None, None]
    f, b, w, fb, comm = results[0][0]
    assert f > 0 and b > 0 and w >= 0 and fb > 0 and comm >= 0
    # the measured costs feed the search
    again = search(2, 5, Costs(f=f, b=b, w=min(w, b), fb=fb, comm=comm))
    assert again.makespan > 0
