"""Pipeline extensions (dualpipe.runtime.extension): hooks called at the documented
points; ``after_stage_backward(i)`` exactly once per module and training step, right
after the step holding module i's last B/I/W; a refusal reaches every rank."""

from __future__ import annotations

import pytest

from dualpipe.testing import run_distributed

from .extension_workers import record_hooks, refuse_on_one_rank


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe", "1f1b", "zbv"])
def test_hooks_in_order(schedule: str) -> None:
    for log in run_distributed(record_hooks, 2, schedule, timeout=120):
        assert log[0] == ("attach", None) and log[-1] == ("close", None)
        first = log.index(("after_step", True))
        training, inference = log[1 : first + 1], log[first + 1 : -1]
        assert training[0][0] == "step_plan" and training[1] == ("before_step", True)
        assert training[-1] == ("after_step", True)
        assert inference[0][0] == "step_plan" and inference[1] == ("before_step", False)
        assert inference[-1] == ("after_step", False)
        assert not any(k == "after_stage_backward" for k, _ in inference)
        steps = [v for k, v in training if k == "step"]
        assert training[0][1] == steps  # the plan's steps are the steps that ran, in order
        assert inference[0][1] == [v for k, v in inference if k == "step"]
        modules = {m for actions in steps for m, _ in actions}
        done = [v for k, v in training if k == "after_stage_backward"]
        assert sorted(done) == sorted(modules), (done, modules)  # once per module
        for module in modules:  # right after the step with its last backward work
            last = max(i for i, actions in enumerate(steps)
                       if any(m == module and op != "F" for m, op in actions))
            k = training.index(("after_stage_backward", module))
            before = [v for kind, v in training[:k] if kind == "step"]
            assert len(before) == last + 1, (schedule, module, last, len(before))


def test_refusal_reaches_every_rank() -> None:
    messages = run_distributed(refuse_on_one_rank, 2, timeout=120)
    assert "refused by the test extension" in messages[1]
    assert "refused by the test extension" in messages[0], messages[0]
