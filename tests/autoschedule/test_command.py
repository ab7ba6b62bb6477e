"""``dualpipe autoschedule``: prints the search's schedule and summary, writes JSON the
validator accepts, and reports bad arguments as usage errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualpipe.autoschedule import search
from dualpipe.cli import main
from dualpipe.schedules import Schedule, validate
from dualpipe.simulation import Costs, simulate

ARGS = ["--ranks", "3", "--chunks", "7", "--f", "1", "--b", "2", "--w", "1", "--fb", "2.2",
        "--comm", "0.2"]  # fmt: skip
COSTS = Costs(f=1, b=2, w=1, fb=2.2, comm=0.2)


def test_text_output_is_the_search_result(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["autoschedule", *ARGS]) == 0
    out = capsys.readouterr().out
    found = search(3, 7, COSTS)
    assert out.startswith(found.schedule.to_text() + "\n")
    assert f"peak memory {found.memory:g} per rank (limit 7): {found.peak} activations" in out
    assert found.memory <= 7
    assert "seeds: dualpipev" in out


def test_json_and_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "auto.json"
    assert main(["autoschedule", *ARGS, "--json", "--limit", "6", "-o", str(target)]) == 0
    data = json.loads(capsys.readouterr().out)
    schedule = Schedule.from_dict(data["schedule"])
    validate(schedule)
    assert data["limit"] == 6 and data["peak_activations"] <= data["peak_memory"] <= 6
    assert data["w_memory"] == 1.0  # the default state per deferred weight gradient
    assert data["deferred_weights"] >= 0
    assert data["seeds"]["dualpipev"] is None  # DualPipeV needs 7 per rank
    assert simulate(schedule, COSTS).makespan == pytest.approx(data["makespan"])
    assert Schedule.from_dict(json.loads(target.read_text())) == schedule
    assert main(["validate", str(target)]) == 0


def test_max_deferred(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["autoschedule", *ARGS, "--max-deferred", "1"]) == 0
    assert "deferred weight gradients at most 1 per rank" in capsys.readouterr().out


def test_dualpipe_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["autoschedule", "--ranks", "4", "--chunks", "8", "--layout", "dualpipe"]) == 0
    assert "seeds: dualpipe" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--limit", "1"], "memory limit >= 2"),
        (["--layout", "ring"], "invalid choice"),
        (["--w", "5"], "cannot exceed"),
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    assert main(["autoschedule", "--ranks", "2", "--chunks", "4", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualpipe: error:") and message in err
