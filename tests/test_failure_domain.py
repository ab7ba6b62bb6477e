"""One failure domain per job, inside the collectives of other process groups: a rank of
one data-parallel replica fails while the other replica waits inside a data-parallel
collective (GradientSync's all-reduce, FSDP2's reduce-scatter or all-gather, the
token_mean count) on a group whose timeout is gloo's default (30 minutes; the run is
bounded at 60 s); every rank raises within a few seconds, naming the failed process and
action, and the group left with a collective in flight is refused afterwards on the
ranks that use it. Before, the waiting replica raised only at the group's timeout."""

from __future__ import annotations

from typing import Any

import pytest

from dualpipe.testing import run_distributed

from .failure_domain_workers import (
    FAILING,
    fsdp,
    gradient_sync,
    patched_methods,
    slow_replica,
    token_mean,
)

TIMEOUT = 60.0
"""The run's bound (and the default group's timeout; the groups new_group and
init_device_mesh make keep gloo's default, 30 minutes)."""

WITHIN = 4.0
"""Seconds from the failure to every rank's error (the failure watch looks every 0.2 s;
the machine's two cores are shared)."""

NAMED = f"process {FAILING} (pipeline rank 1) failed"


def _check(reports: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    """Every rank failed soon after the failing rank, naming it and ``action``; returns
    replica 1's reports (processes 2 and 3)."""
    failed_at = reports[FAILING]["failed_at"]
    for r in reports:
        assert "message" in r, r
        assert action in r["message"], r
        assert r["at"] - failed_at < WITHIN, (r["rank"], r["at"] - failed_at, r["message"])
        if r["rank"] != FAILING:
            assert r["error"] == "RemoteFailure", r
    for r in reports[2:]:  # the other replica: the process is named too
        assert NAMED in r["message"], r
    return reports[2:]


def test_gradient_sync_waiting_for_a_failed_replica() -> None:
    reports = run_distributed(gradient_sync, 4, timeout=TIMEOUT)
    other = _check(reports, "rank 1 failed in F")
    assert reports[FAILING]["error"] == "ActionFailure"
    for r in other:  # inside GradientSync's all-reduce when the failure came
        assert r["where"] == "sync" and r["entered"] < reports[FAILING]["failed_at"], r
        assert "GradientSync's all-reduce" in r["message"] and "in flight" in r["message"], r
        assert "build new process groups" in r["message"], r
    for r in reports:  # both groups were left with an all-reduce in flight: refused
        assert "was left with a collective in flight" in r["refused"], r


@pytest.mark.parametrize(("at_call", "collective"),
                         [(4, "reduce-scatter"), (1, "all-gather")])
def test_fsdp_waiting_for_a_failed_replica(at_call: int, collective: str) -> None:
    reports = run_distributed(fsdp, 4, at_call, timeout=TIMEOUT)
    other = _check(reports, f"rank 1 failed in F0.{at_call - 1} (dualpipev)")
    inside = [r for r in other if "in flight" in r["message"]]
    assert inside, other  # at least one waited inside the collective
    for r in inside:
        assert "FSDP2" in r["message"] and f"({collective}) on process group" in r["message"], r
    assert "was left with a collective in flight" in reports[3]["refused"], reports[3]
    assert "was left with a collective in flight" in reports[FAILING]["refused"]


def test_token_mean_count_waiting_for_a_failed_replica() -> None:
    reports = run_distributed(token_mean, 4, timeout=TIMEOUT)
    other = _check(reports, "rank 1 computes the loss: training (grad enabled) needs a criterion")
    assert reports[FAILING]["error"] == "ValueError"
    blocked = reports[3]
    assert blocked["entered"] < reports[FAILING]["failed_at"], blocked
    assert "label count over data_group" in blocked["message"], blocked
    assert "in flight" in blocked["message"], blocked
    for r in (reports[1], reports[3]):
        assert "was left with a collective in flight" in r["refused"], r
    for r in (reports[0], reports[2]):  # their data-parallel group was not touched
        assert r["refused"] == "", r
    del other


def test_a_late_replica_is_waited_for() -> None:
    """The control: no failure, replica 0 late by a second; replica 1's sync() waits for it
    and the gradients are exact."""
    took = run_distributed(slow_replica, 4, timeout=TIMEOUT)
    assert took[2] > 0.5 and took[3] > 0.5, took


def test_the_polled_collectives_give_the_same_values() -> None:
    kinds = run_distributed(patched_methods, 3, timeout=TIMEOUT)  # AVG over 3: exact too
    for k in kinds:  # outside: gloo's work; inside: the failure-checked one
        assert k[0] != "_PolledWork" and k[1] == "_PolledWork", k
