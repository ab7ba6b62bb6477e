"""The command line (``dualpipe`` / ``python -m dualpipe``)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dualpipe import Costs, generate, simulate
from dualpipe.cli import main
from dualpipe.schedules import Schedule, layout_for, step_actions
from dualpipe.simulation import seed_bubble
from dualpipe.viz import compare_table, format_compare_table


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("name", "ranks", "chunks"),
    [
        ("dualpipe", 4, 8),
        ("dualpipe", 8, 20),
        ("dualpipev", 4, 10),
        ("1f1b", 3, 5),
        ("zb1p", 4, 8),
    ],
)
def test_schedule_text_is_exactly_the_rank_lines(
    capsys: pytest.CaptureFixture[str], name: str, ranks: int, chunks: int
) -> None:
    code, out, err = run(capsys, "schedule", name, "--ranks", str(ranks), "--chunks", str(chunks))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == ranks
    assert [line.split(":")[0] for line in lines] == [f"rank {r}" for r in range(ranks)]
    expected = generate(name, ranks, chunks)
    parsed = Schedule.from_text(out, layout_for(name, ranks), name=name)
    assert parsed == expected


def test_schedule_json_and_output_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(
        capsys, "schedule", "dualpipev", "--ranks", "2", "--chunks", "6", "--format", "json"
    )
    assert code == 0
    assert Schedule.from_dict(json.loads(out)) == generate("dualpipev", 2, 6)
    target = tmp_path / "s.txt"
    code, out, err = run(
        capsys, "schedule", "dualpipe", "--ranks", "2", "--chunks", "4", "-o", str(target)
    )
    assert code == 0 and out == "" and str(target) in err
    assert target.read_text() == generate("dualpipe", 2, 4).to_text() + "\n"


def test_schedule_png_and_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "s.png"
    code, out, err = run(
        capsys,
        "schedule",
        "dualpipe",
        "--ranks",
        "4",
        "--chunks",
        "8",
        "--format",
        "png",
        "-o",
        str(png),
    )
    assert code == 0 and out == "" and f"wrote {png}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trace_path = tmp_path / "s.json"
    code, _, _ = run(
        capsys,
        "schedule",
        "dualpipe",
        "--ranks",
        "4",
        "--chunks",
        "8",
        "--format",
        "trace",
        "-o",
        str(trace_path),
        "--f",
        "2",
        "--b",
        "3",
    )
    assert code == 0
    trace = json.loads(trace_path.read_text())
    schedule = generate("dualpipe", 4, 8)
    result = simulate(schedule, Costs(f=2, b=3, w=1))
    kinds = {"F", "B", "I", "W"}
    actions = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] in kinds]
    assert len(actions) == sum(len(step_actions(s)) for row in schedule.steps for s in row)
    end = max(e["ts"] + e["dur"] for e in actions)
    assert end == pytest.approx(result.makespan * 1000)


def test_simulate_json_equals_simulate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "simulate",
        "dualpipe",
        "--ranks",
        "8",
        "--chunks",
        "20",
        "--f",
        "1",
        "--b",
        "2",
        "--w",
        "1",
        "--fb",
        "2.5",
        "--comm",
        "0.25",
        "--json",
    )
    assert code == 0 and err == ""
    data = json.loads(out)
    costs = Costs(f=1, b=2, w=1, fb=2.5, comm=0.25)
    result = simulate(generate("dualpipe", 8, 20), costs)
    assert data["makespan"] == pytest.approx(result.makespan)
    assert len(data["busy"]) == len(data["bubble"]) == len(data["peak_activations"]) == 8
    assert data["busy"] == pytest.approx(result.busy)
    assert data["bubble"] == pytest.approx(result.bubble)
    assert data["peak_activations"] == result.peak_activations
    assert all(isinstance(x, int) for x in data["peak_activations"])
    assert data["seed_bubble"] == pytest.approx(seed_bubble("dualpipe", 8, costs))
    assert data["params_per_device"] == 2
    assert data["costs"] == {"f": 1, "b": 2, "w": 1, "fb": 2.5, "comm": 0.25, "w_memory": 1.0}
    assert data["peak_memory"] == result.peak_memory


def test_simulate_json_peak_memory_counts_deferred_weight_state(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ZBV on 4 ranks: the last rank keeps up to 5 weight gradients deferred while it
    holds 8 activations' worth, so at 1.5 activations per deferred W its peak is 10.5 (the
    figure measured before the input backward freed what W does not read); per stage."""
    code, out, _ = run(capsys, "simulate", "zbv", "--ranks", "4", "--chunks", "8",
                       "--w-memory", "1.5", "--json")  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["peak_activations"] == [8, 8, 8, 8]
    assert data["peak_memory"] == [8.5, 8.5, 8.5, 10.5]
    assert data["w_memory"] == 1.5
    per_stage = ",".join(["0"] * 7 + ["2"])  # only stage 7 (rank 0's second) keeps state
    code, out, _ = run(capsys, "simulate", "zbv", "--ranks", "4", "--chunks", "8",
                       "--w-memory", per_stage, "--json")  # fmt: skip
    assert json.loads(out)["w_memory"] == [0.0] * 7 + [2.0]
    code, _, err = run(capsys, "simulate", "zbv", "--ranks", "4", "--chunks", "8",
                       "--w-memory", "x")  # fmt: skip
    assert code == 2 and "--w-memory" in err


def test_simulate_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "simulate", "zb1p", "--ranks", "4", "--chunks", "8")
    assert code == 0
    result = simulate(generate("zb1p", 4, 8), Costs())
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [[float(x) for x in row] for row in rows] == [
        [r, result.busy[r], result.bubble[r], result.peak_activations[r], result.peak_memory[r]]
        for r in range(4)
    ]
    assert "makespan            27" in out
    assert "seed formula bubble 3" in out


def test_compare_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--stages", "8", "--chunks", "20")
    assert code == 0
    assert out == format_compare_table(compare_table(8, 20, Costs(1, 2, 1, 3))) + "\n"
    code, out, _ = run(capsys, "compare", "--stages", "4", "--chunks", "8", "--comm", "1")
    assert code == 0 and "communication" in out


def test_validate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    schedule = generate("dualpipe", 4, 8)
    (tmp_path / "s.json").write_text(schedule.to_json())
    (tmp_path / "s.txt").write_text(schedule.to_text())
    assert run(capsys, "validate", str(tmp_path / "s.json"))[:2] == (0, "ok\n")
    assert run(capsys, "validate", str(tmp_path / "s.txt"), "--layout", "dualpipe")[:2] == (
        0,
        "ok\n",
    )
    assert run(capsys, "validate", str(tmp_path / "s.txt"), "--layout", "dualpipe", "--ranks", "4")[
        :2
    ] == (0, "ok\n")
    # rank 0 runs a W before the I it belongs to
    bad = schedule.to_text().replace("I1.0 W1.0", "W1.0 I1.0", 1)
    assert bad != schedule.to_text()
    (tmp_path / "bad.txt").write_text(bad)
    code, out, err = run(capsys, "validate", str(tmp_path / "bad.txt"), "--layout", "dualpipe")
    assert code == 1 and out.startswith("unsound:") and "W1.0" in out and err == ""


def test_torch_csv_out_and_in(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["schedule", "zbv", "--ranks", "2", "--chunks", "3", "--format", "torch"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert out.splitlines()[0].startswith("0F0,0F1,0F2,3F0,3I0,3W0,")
    path = tmp_path / "zbv.csv"
    path.write_text(out)
    assert run(capsys, "validate", str(path))[:2] == (0, "ok\n")
    path.write_text(out.replace("3I0,3W0", "3W0,3I0", 1))
    code, out, _ = run(capsys, "validate", str(path))
    assert code == 1 and "W1.0 runs before its I1.0" in out


def test_demo_forwards_its_arguments(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("dualpipe.demo")

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dualpipe.demo", fake)
    assert main(["demo", "--ranks", "4", "--steps", "10"]) == 7
    assert main(["demo", "--help", "-o", "x"]) == 7
    assert main(["demo"]) == 7
    assert seen == [["--ranks", "4", "--steps", "10"], ["--help", "-o", "x"], []]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["schedule", "dualpipe", "--ranks", "3", "--chunks", "8"], "even"),
        (["schedule", "dualpipe", "--ranks", "4", "--chunks", "7"], "num_chunks must be even"),
        (["schedule", "dualpipe", "--ranks", "0", "--chunks", "8"], "positive"),
        (["schedule", "pipedream", "--ranks", "4", "--chunks", "8"], "unknown schedule"),
        (["schedule", "dualpipe", "--ranks", "four", "--chunks", "8"], "invalid int"),
        (["schedule", "dualpipe", "--chunks", "8"], "--ranks"),
        (["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--format", "png"], "-o FILE"),
        (["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--format", "trace"], "-o FILE"),
        (["schedule", "dualpipe", "--ranks", "4", "--chunks", "8", "--format", "svg"], "svg"),
        (["simulate", "dualpipe", "--ranks", "4", "--chunks", "8", "--f", "-1"], "cost f"),
        (["simulate", "dualpipe", "--ranks", "4", "--chunks", "8", "--comm", "-2"], "cost comm"),
        (["simulate", "dualpipe", "--ranks", "4", "--chunks", "8", "--w", "3"], "cannot exceed"),
        (["simulate", "dualpipe", "--ranks", "4", "--chunks", "8", "--fb", "-3"], "cost fb"),
        (["compare", "--stages", "5", "--chunks", "20"], "even"),
        (["compare", "--stages", "8", "--chunks", "0"], "no method fits"),
        (["validate", "/nonexistent/schedule.json"], "cannot read"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("dualpipe: error: ")
    assert needle in err
    assert "Traceback" not in err


def test_text_schedule_needs_a_layout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text(generate("1f1b", 2, 2).to_text())
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "--layout" in err and err.count("\n") == 1
    code, _, err = run(capsys, "validate", str(path), "--layout", "spiral")
    assert code == 2 and "unknown layout" in err
    path.write_text("{not json")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "not valid JSON" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "schedule" in capsys.readouterr().out


def test_python_dash_m_dualpipe() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dualpipe", "schedule", "dualpipe", "--ranks", "4", "--chunks", "8"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"rank {r}: ") for r, line in enumerate(lines))
    assert proc.stdout == generate("dualpipe", 4, 8).to_text() + "\n"


def test_schedule_with_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schedule", "dualpipev", "--ranks", "2", "--chunks", "6",
                       "--pairs")
    assert code == 0
    assert out.startswith("rank 0: F0.0 F0.1+F0.2 ")  # nominal parts: warm-up forwards pair
    code, plain, _ = run(capsys, "schedule", "dualpipev", "--ranks", "2", "--chunks", "6")
    assert code == 0 and "F0.1+F0.2" not in plain
    # no communication to hide: nothing to gain, the schedule as generated
    code, flat, _ = run(capsys, "schedule", "dualpipev", "--ranks", "2", "--chunks", "6",
                        "--pairs", "--part-f", "1,0,1", "--part-b", "1,0,1", "--part-w", "1,1")
    assert code == 0 and flat == plain


@pytest.mark.parametrize(("kind", "pair", "apart"),
                         [("FF", 20, 32), ("II", 20, 32), ("BB", 36, 48), ("FB", 24, 40)])
def test_pair_kinds(capsys: pytest.CaptureFixture[str], kind: str, pair: int,
                    apart: int) -> None:
    # parts 4, comm 4, 4, part 0 (forward and backward), weight 4, 4, 0: one forward
    # alone takes 16, an input-only backward 16, a full backward 24
    code, out, _ = run(capsys, "pair", "--kind", kind, "--part-f", "4,4,4,4,0",
                       "--part-b", "4,4,4,4,0", "--part-w", "4,4,0")
    assert code == 0
    assert f"pair {pair} vs " in out and f" {apart}; " in out, out
