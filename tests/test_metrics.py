"""Step metrics computed from a measured timeline."""

from __future__ import annotations

import pytest

from dualpipe.metrics import timeline_metrics
from dualpipe.runtime.timeline import MeasuredTimeline
from dualpipe.schedules import generate
from dualpipe.schedules.actions import parse_step
from dualpipe.simulation import TimedStep
from dualpipe.viz import TimedWait


def test_metrics_of_a_hand_made_timeline() -> None:
    schedule = generate("1f1b", 2, 1)
    steps = [
        [TimedStep(0, parse_step("F0.0"), 0.0, 2.0), TimedStep(0, parse_step("B0.0"), 6.0, 10.0)],
        [TimedStep(1, parse_step("F0.0"), 2.0, 4.0), TimedStep(1, parse_step("B0.0"), 4.0, 8.0)],
    ]
    waits = [[], [TimedWait(1, "wait activation", 2.0, 3.0)]]  # inside rank 1's F
    m = timeline_metrics(MeasuredTimeline(schedule, steps, waits), tokens=500)
    assert m.step_ms == 10.0
    assert m.idle_ms == [4.0, 10.0 - 6.0 + 1.0]
    assert m.busy_ms == [6.0, 5.0]
    assert m.bubble == pytest.approx((4.0 + 5.0) / 2 / 10.0)
    assert m.tokens_per_s == pytest.approx(50_000.0)
    assert timeline_metrics(MeasuredTimeline(schedule, steps, waits)).tokens_per_s is None


def test_peak_memory_of_a_measured_timeline() -> None:
    """A timeline with memory samples reports each rank's largest; without, nothing."""
    schedule = generate("1f1b", 2, 1)
    steps = [
        [TimedStep(0, parse_step("F0.0"), 0.0, 2.0), TimedStep(0, parse_step("B0.0"), 6.0, 10.0)],
        [TimedStep(1, parse_step("F0.0"), 2.0, 4.0), TimedStep(1, parse_step("B0.0"), 4.0, 8.0)],
    ]
    memory = [[(2.0, 300), (10.0, 0), (10.1, 0)], [(4.0, 500), (8.0, 20), (8.1, 20)]]
    timeline = MeasuredTimeline(schedule, steps, [[], []], memory)
    assert timeline.peak_memory == [300, 500]
    assert timeline_metrics(timeline).peak_memory_bytes == [300, 500]
    assert timeline_metrics(MeasuredTimeline(schedule, steps, [[], []])).peak_memory_bytes == []
