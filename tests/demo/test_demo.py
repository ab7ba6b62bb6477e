"""The demo end to end on spawned gloo ranks, its options, and its bubble arithmetic."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from dualpipe.demo import main
from dualpipe.demo.report import OUTPUT_FILES, idle_ms
from dualpipe.demo.train import DemoOptions, train_rank
from dualpipe.runtime.timeline import MeasuredTimeline
from dualpipe.schedules import generate
from dualpipe.schedules.actions import parse_step
from dualpipe.simulation import TimedStep
from dualpipe.testing import run_distributed
from dualpipe.viz import TimedWait

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    assert b"IEND" in data[-16:]
    return struct.unpack(">II", data[16:24])


def test_demo_trains_checks_gradients_and_writes_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    argv = ["--ranks", "2", "--schedule", "dualpipev", "--steps", "3", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gradient check vs single process: OK" in printed
    assert "simulated step time" in printed and "bubble" in printed

    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name
    width, height = _png_size(out / "loss.png")
    assert width > 300 and height > 200
    width, height = _png_size(out / "timeline.png")
    assert width > 300 and height > 100

    summary = json.loads((out / "summary.json").read_text())
    assert summary["schedule"] == "dualpipev"
    assert (summary["ranks"], summary["stages"], summary["chunks"]) == (2, 4, 4)
    assert summary["grad_check"]["ok"] and summary["grad_check"]["losses_equal"]
    assert summary["grad_check"]["max_abs_diff"] <= 1e-5
    losses = summary["loss"]["per_step"]
    assert len(losses) == 3 and all(0 < v < 5 for v in losses)
    assert summary["loss"]["first"] == losses[0] and summary["loss"]["last"] == losses[-1]
    assert len(summary["step_ms"]["per_step"]) == 3 and summary["step_ms"]["median"] > 0
    assert summary["measured_step_ms"] > 0 and summary["simulated_step_ms"] > 0
    bubble = summary["bubble_ms"]
    assert len(bubble["per_rank"]) == 2 and 0 <= bubble["mean"] <= bubble["max"]
    assert bubble["max"] <= summary["measured_step_ms"] + 1e-6
    assert 0 <= bubble["mean_pct"] <= 100
    assert summary["recorded_step"] in (1, 2)
    assert summary["wall_s"] > 0

    trace = json.loads((out / "timeline.json").read_text())
    cats = {e.get("cat") for e in trace["traceEvents"]}
    assert {"F", "I", "W"} <= cats
    assert trace["otherData"]["num_chunks"] == 4


def test_dualpipe_mirrored_stages_train_like_one_process() -> None:
    opts = DemoOptions(schedule="dualpipe", chunks=4, steps=2, micro_batch=2, progress=False,
                       record_steps=1)
    results = run_distributed(train_rank, 2, opts, timeout=120)
    reporter = [r for r in results if r.reporter]
    assert [r.rank for r in reporter] == [0]
    check = reporter[0].grad_check
    assert check is not None and check.ok and check.losses_equal, check
    assert len(reporter[0].losses) == 2 and reporter[0].timeline is not None
    assert reporter[0].timeline.schedule.name == "dualpipe"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--schedule", "pipedream"], "invalid choice"),
        (["--chunks", "0"], "chunks must be a positive integer"),
        (["--schedule", "dualpipe", "--ranks", "3"], "number of ranks must be even"),
        (["--schedule", "dualpipe", "--chunks", "9"], "must be even"),
        (["--ranks", "0"], "--ranks must be between"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--ranks", "four"], "invalid int value"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_fail_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualpipe demo: error:") and message in err
    assert err.count("\n") == 1


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["--out", str(path)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--schedule" in capsys.readouterr().out


def test_idle_time_counts_gaps_and_waits_inside_actions() -> None:
    schedule = generate("1f1b", 2, 1)  # rank 0: F0.0 B0.0, rank 1: F0.0 B0.0
    steps = [
        [TimedStep(0, parse_step("F0.0"), 0.0, 2.0), TimedStep(0, parse_step("B0.0"), 6.0, 10.0)],
        [TimedStep(1, parse_step("F0.0"), 1.0, 5.0), TimedStep(1, parse_step("B0.0"), 5.0, 7.0)],
    ]
    waits = [
        [TimedWait(0, "wait gradient mb0 from r1", 6.0, 7.5)],  # inside B: idle too
        [TimedWait(1, "wait activation mb0 from r0", 1.0, 2.0)],  # inside F
    ]
    timeline = MeasuredTimeline(schedule, steps, waits)
    assert timeline.makespan == 10.0
    assert idle_ms(timeline) == [10.0 - 6.0 + 1.5, 10.0 - 6.0 + 1.0]


def test_moe_demo_checks_gradients_and_overlaps(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe"
    assert main(["--model", "moe", "--steps", "2", "--chunks", "4", "--micro-batch", "2",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "gradient check vs single process: OK" in printed
    summary = json.loads((out / "moe_summary.json").read_text())
    assert summary["grad_check"]["ok"] and len(summary["losses"]) == 2
    assert summary["pairs_interleaved"] > 0 and summary["comm_ms"] > 0
    rows = {iv["resource"] for iv in summary["pair"]}
    assert rows == {"compute", "comm"}
    width, _ = _png_size(out / "moe_pair.png")
    assert width > 300
    assert main(["--model", "moe", "--ranks", "2", "--out", str(out)]) == 2
