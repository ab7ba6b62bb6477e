"""benchmarks/gpu_check.py: its CPU dry run passes every check and reports what it must,
it refuses to run without CUDA, and its CUDA trace parsing reads kernels per stream."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p
    )
    env.pop("OUT", None)
    env.update(extra)
    return env


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_passes_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run"],
        capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path,
        env=_env(OUT=str(tmp_path / "pictures")),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    # the summary table, then the JSON line
    assert any(line.startswith("| section") and "| result" in line for line in lines)
    for key in ("ok", "device", "dry_run", "checks", "failed", "exactness", "split", "messages",
                "moe", "memory", "costs", "pictures", "seconds"):
        assert key in summary, key
    assert summary["ok"] is True and summary["failed"] == [] and summary["dry_run"] is True
    assert all(c["ok"] is not False for c in summary["checks"])
    # every exactness check ran and passed: 2 schedules x 2 precisions, 6 layer kinds
    assert set(summary["exactness"]) == {"dualpipev fp32", "dualpipev bf16", "zbv fp32",
                                         "zbv bf16"}
    for name, row in summary["exactness"].items():
        assert row["losses_equal"] is True, name
        assert row["max_rel_grad"] <= row["bound"], name
    assert {"Linear", "attention", "MoE experts", "LayerNorm"} <= set(summary["split"])
    for kind, row in summary["split"].items():
        assert row["max_rel"] <= 1e-5 and row["touched_by_I"] == 0, kind
    exact = [c for c in summary["checks"] if c["section"] == "exactness"]
    assert len(exact) >= 8 + 4 and all(c["ok"] is True for c in exact)
    # a one-rank pipeline posts no message; the MoE stage ran its all-to-alls, interleaved
    assert summary["messages"] == {"posted": 0, "planned": 0, "backend": "gloo"}
    moe = summary["moe"]
    assert moe["losses_equal"] is True and moe["max_rel_grad"] <= 1e-5
    assert moe["all_to_alls"] > 0 and moe["device_side"] == 0 and moe["pairs_interleaved"] > 0
    assert summary["memory"]["peak_activations"] > 0 and summary["memory"]["steps"] == []
    methods = [r["method"] for r in summary["costs"]["table"]]
    assert methods == ["1F1B", "ZB1P", "DualPipe", "DualPipeV", "ZBV", "auto (best)"]
    assert set(summary["costs"]["measured_ms"]) == {"f", "b", "i", "w", "fb"}
    pictures = {Path(p).name for p in summary["pictures"]}
    assert {"pipeline_timeline.png", "moe_pair.png", "moe_streams.png"} <= pictures
    for p in summary["pictures"]:
        assert Path(p).parent == tmp_path / "pictures" and Path(p).stat().st_size > 0


def test_without_cuda_it_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
        check=False, cwd=tmp_path, env=_env(CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert proc.stdout == ""


def test_cuda_trace_rows_per_stream_and_overlap() -> None:
    """The CUDA branch of the trace reading (which the dry run cannot reach): kernels and
    copies per stream, everything on NCCL's stream is communication, and the time it
    overlaps computation."""
    gc = _load()
    events = [
        {"ph": "X", "cat": "kernel", "name": "ampere_gemm", "ts": 1000.0, "dur": 400.0,
         "args": {"stream": 7}},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_SendRecv", "ts": 1200.0,
         "dur": 500.0, "args": {"stream": 21}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 1800.0, "dur": 100.0,
         "args": {"stream": 21}},
        {"ph": "X", "cat": "kernel", "name": "softmax", "ts": 1600.0, "dur": 100.0,
         "args": {"stream": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 900.0, "dur": 50.0, "tid": 1},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1000.0},
    ]
    rows = gc.trace_rows(events, True)
    assert [(r[0], r[4]) for r in rows] == [
        ("stream 7", False), ("stream 21 (NCCL)", True), ("stream 21 (NCCL)", True),
        ("stream 7", False)]
    assert rows[0][2] == 0.0 and rows[1][2] == pytest.approx(0.2)
    comm = [(a, b) for _, _, a, b, c in rows if c]
    compute = [(a, b) for _, _, a, b, c in rows if not c]
    assert gc.union(comm) == pytest.approx(0.6)
    # NCCL 0.2-0.7 and copy 0.8-0.9 against compute 0.0-0.4 and 0.6-0.7
    assert gc.overlap(comm, compute) == pytest.approx(0.3)
    lo, hi = gc.zoom_window(rows)
    assert lo == 0.0 and hi > 0.7


def test_memory_rows_on_cuda_numbers() -> None:
    """The CUDA branch of the memory report, on numbers shaped like the allocator's: the
    ratio to the simulator and the step-to-step growth check (which must fail on a leak)."""
    gc = _load()
    mib = 2**20
    data = {"peak_activations": 9, "unit_bytes": 10 * mib, "predicted_bytes": 90 * mib,
            "chunks": 8, "steps": [
                {"peak_bytes": 130 * mib, "base_bytes": 50 * mib, "after_bytes": 70 * mib},
                {"peak_bytes": 120 * mib, "base_bytes": 70 * mib, "after_bytes": 70 * mib},
                {"peak_bytes": 117 * mib, "base_bytes": 70 * mib, "after_bytes": 70 * mib},
            ]}
    report = gc.Report(device="test", dry_run=False)
    gc.memory_rows(report, data, True)
    assert data["ratio_last_to_simulated"] == pytest.approx(1.3)
    growth = [c for c in report.checks if c.name == "no growth from step to step"]
    assert len(growth) == 1 and growth[0].ok is True
    data["steps"][2]["after_bytes"] = 75 * mib  # a step that kept 5 MiB
    leaky = gc.Report(device="test", dry_run=False)
    gc.memory_rows(leaky, data, True)
    assert [c.ok for c in leaky.checks if c.name == "no growth from step to step"] == [False]
