"""Pipelines release what they hold, and processes that caught a failure exit cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dualpipe.testing import free_port, run_distributed

from .lifecycle_workers import create_and_close

ROOT = Path(__file__).resolve().parents[2]


def test_twelve_pipelines_leave_threads_and_fds_where_they_were() -> None:
    for before, after, most in run_distributed(create_and_close, 2, timeout=120):
        assert most > before[0]  # a live pipeline does hold threads
        # nothing left behind (a socket of the warm-up's group may close only later)
        assert after[0] <= before[0] and after[1] <= before[1], (before, after)


def test_process_exits_with_code_zero_after_a_caught_failure() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.runtime.lifecycle_workers", str(r), "2", str(port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, (r, p.returncode, out)
        assert f"rank {r} caught" in out and "boom" in out, out
