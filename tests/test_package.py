"""The top-level package: public names, and ``import dualpipe`` without torch."""

from __future__ import annotations

import os
import subprocess
import sys

import dualpipe


def test_import_does_not_load_torch() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = "import sys, dualpipe; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_public_errors_and_original_helpers_are_top_level() -> None:
    from dualpipe.errors import PipelineError, RemoteFailure, ScheduleError
    from dualpipe.runtime.declared import set_p2p_tensor_shapes
    from dualpipe.utils import WeightGradStore

    assert dualpipe.PipelineError is PipelineError
    assert dualpipe.RemoteFailure is RemoteFailure and issubclass(RemoteFailure, PipelineError)
    assert dualpipe.ScheduleError is ScheduleError
    assert dualpipe.WeightGradStore is WeightGradStore
    assert dualpipe.set_p2p_tensor_shapes is set_p2p_tensor_shapes
    assert callable(dualpipe.set_p2p_tensor_dtype)
    for name in dualpipe.__all__:
        assert getattr(dualpipe, name) is not None, name
