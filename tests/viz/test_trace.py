"""Chrome / Perfetto trace export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpipe import Costs, generate, simulate
from dualpipe.schedules import Overlap, step_actions
from dualpipe.viz import TimedWait, chrome_trace, write_trace

COSTS = Costs(f=1, b=2, w=1, fb=3)


def _complete(trace: dict, cats: set[str]) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] in cats]


def test_one_event_per_action_with_times_in_microseconds() -> None:
    schedule = generate("dualpipe", 4, 8)
    result = simulate(schedule, COSTS)
    trace = chrome_trace(result.timeline, schedule)
    actions = _complete(trace, {"F", "B", "I", "W"})
    assert len(actions) == sum(len(list(schedule.actions(r))) for r in range(4))
    by_rank: dict[int, list[dict]] = {}
    for e in actions:
        by_rank.setdefault(e["pid"], []).append(e)
    for rank, steps in enumerate(result.timeline):
        events = iter(by_rank[rank])
        for timed in steps:
            start, dur = timed.start * 1000, (timed.end - timed.start) * 1000
            if isinstance(timed.step, Overlap):
                fwd, bwd = next(events), next(events)
                assert (fwd["name"], bwd["name"]) == (
                    str(timed.step.first),
                    str(timed.step.second),
                )
                assert fwd["ts"] == pytest.approx(start)
                assert fwd["ts"] + fwd["dur"] == pytest.approx(bwd["ts"])  # adjacent halves
                assert fwd["dur"] + bwd["dur"] == pytest.approx(dur)
                assert fwd["args"]["pair"] == bwd["args"]["pair"] == str(timed.step)
            else:
                event = next(events)
                assert event["name"] == str(timed.step)
                assert (event["ts"], event["dur"]) == pytest.approx((start, dur))


def test_pairs_enclose_their_halves() -> None:
    schedule = generate("dualpipev", 2, 4)
    result = simulate(schedule, COSTS)
    trace = chrome_trace(result.timeline, schedule, us_per_unit=1.0)
    pairs = _complete(trace, {"pair"})
    expected = [
        (r, str(t.step), t.start, t.end - t.start)
        for r, row in enumerate(result.timeline)
        for t in row
        if isinstance(t.step, Overlap)
    ]
    assert [(e["pid"], e["name"], e["ts"], e["dur"]) for e in pairs] == expected
    assert all("+" in e["name"] and e["args"]["kind"].startswith("overlapped") for e in pairs)


def test_args_describe_the_layout() -> None:
    schedule = generate("dualpipe", 4, 8)
    trace = chrome_trace(simulate(schedule, COSTS).timeline, schedule)
    layout = schedule.layout
    for e in _complete(trace, {"F", "B", "I", "W"}):
        args, rank = e["args"], e["pid"]
        stream, _ = layout.locate(rank, args["phase"])
        assert args["token"] == e["name"]
        assert args["stream"] == stream
        assert args["stage"] == layout.stage(rank, args["phase"])
        assert args["micro_batch"] == int(e["name"].split(".")[1])
        assert args["global_micro_batch"] == stream * 4 + args["micro_batch"]
        assert args["direction"].startswith("down" if stream == 0 else "up")
    names = {
        e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"
    }
    assert names == {
        0: "rank 0 (S0, S3)",
        1: "rank 1 (S1, S2)",
        2: "rank 2 (S2, S1)",
        3: "rank 3 (S3, S0)",
    }


def test_waits_and_write_trace(tmp_path: Path) -> None:
    schedule = generate("1f1b", 2, 4)
    result = simulate(schedule, COSTS)
    waits = [[], [TimedWait(1, "recv F0.0", 0.0, 1.0)]]
    out = tmp_path / "t.json"
    write_trace(result.timeline, schedule, out, waits=waits)
    trace = json.loads(out.read_text())
    assert trace == chrome_trace(result.timeline, schedule, waits=waits)
    (wait,) = _complete(trace, {"wait"})
    assert (wait["pid"], wait["tid"], wait["ts"], wait["dur"], wait["name"]) == (
        1,
        1,
        0.0,
        1000.0,
        "recv F0.0",
    )
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in trace["traceEvents"]
        if e["name"] == "thread_name"
    }
    assert threads == {
        (0, 0): "compute",
        (0, 1): "recv wait",
        (1, 0): "compute",
        (1, 1): "recv wait",
    }
    total = sum(len(step_actions(t.step)) for row in result.timeline for t in row)
    assert len(_complete(trace, {"F", "B", "I", "W"})) == total == 16
