"""Terminal rendering of timelines."""

from __future__ import annotations

import pytest

from dualpipe import Costs, generate, simulate
from dualpipe.schedules import Overlap, parse_step
from dualpipe.viz import TimedWait, render_text, render_tokens

COSTS = Costs(f=1, b=2, w=1, fb=3)


def _rank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("rank ")]


def _letter(schedule, rank, action) -> str:
    stream = schedule.layout.locate(rank, action.phase)[0]
    return action.op.value.lower() if stream == 1 else action.op.value


def test_one_line_per_rank_scaled_to_width() -> None:
    schedule = generate("dualpipe", 8, 20)
    result = simulate(schedule, COSTS)
    text = render_text(result.timeline, schedule, width=90)
    lines = text.splitlines()
    assert len(lines) == 8 + 2  # scale header, ranks, legend
    rows = _rank_lines(text)
    assert [r.split("|")[0] for r in rows] == [f"rank {r} " for r in range(8)]
    assert all(len(r.split("|")[1]) == 90 for r in rows)
    assert "lower case up" in lines[-1]
    bare = render_text(result.timeline, schedule, width=90, legend=False)
    assert bare.splitlines() == rows


def test_every_step_label_at_its_start_column() -> None:
    schedule = generate("dualpipe", 4, 8)
    result = simulate(schedule, COSTS)
    width = int(result.makespan * 6)  # 6 columns per unit: every label fits
    rows = [r.split("|")[1] for r in _rank_lines(render_text(result.timeline, schedule, width))]
    for rank, steps in enumerate(result.timeline):
        for timed in steps:
            col = round(timed.start * width / result.makespan)
            step = timed.step
            if isinstance(step, Overlap):
                label = (
                    f"{_letter(schedule, rank, step.first)}{step.first.chunk}+"
                    f"{_letter(schedule, rank, step.second)}{step.second.chunk}"
                )
            else:
                label = f"{_letter(schedule, rank, step)}{step.chunk}"
            assert rows[rank][col : col + len(label)] == label, (rank, str(step))
    # busy columns total the busy time; the rest is blank (idle)
    for rank, row in enumerate(rows):
        assert abs(sum(c != " " for c in row) - result.busy[rank] * 6) <= 1


def test_second_direction_is_lower_case() -> None:
    schedule = generate("dualpipev", 2, 4)
    result = simulate(schedule, COSTS)
    text = render_text(result.timeline, schedule, width=200)
    row0 = _rank_lines(text)[0]
    # rank 0 of DualPipeV: phase 0 forwards go down (F), phase 1 forwards come back up (f)
    assert "F0" in row0 and "f0" in row0 and "B" in row0
    assert "upper case phase 0 (down), lower case phase 1 (up)" in text


def test_waits_drawn_in_idle_time() -> None:
    schedule = generate("1f1b", 2, 2)
    result = simulate(schedule, COSTS)
    first = result.timeline[1][0]
    assert first.start > 0  # rank 1 waits for rank 0's forward
    waits = [[], [TimedWait(1, "recv F0.0", 0.0, first.start)]]
    text = render_text(result.timeline, schedule, width=60, waits=waits)
    row1 = _rank_lines(text)[1].split("|")[1]
    assert row1.startswith("~" * round(first.start * 60 / result.makespan))
    assert "~ waiting to receive" in text
    assert "~" not in _rank_lines(text)[0]


def test_width_too_small() -> None:
    schedule = generate("1f1b", 2, 2)
    with pytest.raises(ValueError, match="width"):
        render_text(simulate(schedule, COSTS).timeline, schedule, width=5)


def test_tokens_view_parses_back_to_the_schedule() -> None:
    schedule = generate("zb1p", 4, 8)
    result = simulate(schedule, COSTS)
    text = render_tokens(result.timeline, schedule)
    lines = text.splitlines()
    assert len(lines) == 4
    for rank, line in enumerate(lines):
        head, _, body = line.partition(": ")
        assert head == f"rank {rank}"
        words = body.split()
        idle = [w for w in words if w.startswith("(idle") or w.endswith(")")]
        tokens = [parse_step(w) for w in words if w not in idle]
        assert tuple(tokens) == schedule.steps[rank]
    # rank 3 (last) starts after 3 forwards of 1 unit each
    assert lines[3].startswith("rank 3: (idle 3) F0.0")
