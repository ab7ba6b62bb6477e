"""The benchmarks' sleep stages split as the benchmark tables assume: our input-only
backward runs only a stage's input branch, the deferred work only its weight branch, and
stage 0 (input without gradient) defers everything. (The benchmark also times them.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from dualpipe.autograd import backward_input

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _stages() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_stages", BENCH / "bench_stages.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_stages", module)
    spec.loader.exec_module(module)
    return module


def test_input_pass_runs_the_input_branch_only() -> None:
    stages = _stages()
    stage = stages.SleepStage(0.0, 0.0, 0.0)
    x = torch.zeros(1, 1024, requires_grad=True)
    out = stage(x)
    stages.reset_counts()
    grads, work = backward_input([out], [torch.zeros_like(out)], [x])
    assert grads[0] is not None
    assert stages.COUNTS == {"forward": 0, "input": 1, "weight": 0}
    work.run()
    assert stages.COUNTS == {"forward": 0, "input": 1, "weight": 1}


def test_stage_zero_defers_everything() -> None:
    stages = _stages()
    first = stages.build_sleep_stages(1, 0.0, 0.0, 0.0)[0]
    out = first(torch.zeros(1, 1024))
    stages.reset_counts()
    _, work = backward_input([out], [torch.zeros_like(out)], [])
    assert stages.COUNTS["weight"] == 0
    work.run()
    assert stages.COUNTS["weight"] == 1
