"""Pipeline stages wrapped in FSDP2 (fully_shard, HSDP), FSDP2's replicate and tensor
parallelism, with the automatic weight-gradient split on: gradients equal one process's
(per-tensor relative error <= 1e-5, two accumulating steps), and the data-parallel group
sees exactly one reduction per FSDP2 parameter group and step and at most one all-gather
(one per run of consecutive uses with reshard_after_forward=True, prefetched one step
ahead or not)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest

from dualpipe.testing import run_distributed

from .fsdp_workers import (
    run_composed,
    run_failure_then_rebuild,
    run_prefetch_order,
    run_refusals,
)


def _check_counts(reports: list[list[dict[str, Any]]], *, gather: str = "once",
                  reduce: tuple[str, ...] = ("reduce_scatter_single",)) -> None:
    """Every rank, every schedule, every training step: each FSDP2 parameter group reduced
    once on this rank's data-parallel group (``reduce``: the collectives of one reduction)
    and all-gathered once (``gather="once"``), at most once per action of its stage
    (``"per-use"``) or never (``"none"``); inference reduces nothing."""
    for rank, report in enumerate(reports):
        for r in report:
            groups = r["groups"]
            assert groups > 0, r
            for counts in r["steps"]:
                for name in reduce:
                    ranks = r["rep_ranks"] if name == "all_reduce" and r["rep_ranks"] \
                        else r["dp_ranks"]
                    assert counts.get((name, ranks), 0) == groups, (rank, r["schedule"], counts)
                other = {k: v for k, v in counts.items()
                         if not k[0].startswith("all_gather") and k[0] not in reduce}
                assert not other, (rank, r["schedule"], counts)
                gathers = sum(v for k, v in counts.items() if k[0].startswith("all_gather"))
                if gather == "once":
                    assert gathers == groups, (rank, r["schedule"], counts)
                elif gather == "none":
                    assert gathers == 0, (rank, r["schedule"], counts)
                else:
                    assert 0 < gathers <= sum(r["num_actions"].values()) * groups, counts
            assert not any(k[0] in reduce for k in r["inference"]), r["inference"]
            assert r["worst"] <= 1e-5, r


@pytest.mark.parametrize("schedules", [["dualpipev", "zbv", "1f1b"], ["dualpipe", "gpipe"]])
def test_fully_shard_exact_one_reduce_scatter(schedules: list[str]) -> None:
    reports = run_distributed(run_composed, 4, schedules, "fsdp", 2, timeout=240)
    _check_counts(reports)


def test_fully_shard_remaining_schedules() -> None:
    reports = run_distributed(run_composed, 4, ["v-half", "v-min", "interleaved-1f1b", "zb1p"],
                              "fsdp", 2, timeout=240)
    _check_counts(reports)


def test_nested_fully_shard() -> None:
    """fully_shard on every layer and then the stage: one reduce-scatter and one
    all-gather per parameter group."""
    reports = run_distributed(run_composed, 4, ["dualpipev", "dualpipe"], "fsdp-nested", 2,
                              timeout=240)
    _check_counts(reports)


def test_split_backward_off() -> None:
    reports = run_distributed(run_composed, 4, ["dualpipev"], "fsdp", 2, 1, 1, False,
                              timeout=240)
    _check_counts(reports)


def test_reshard_after_every_use() -> None:
    """reshard_after_forward=True given explicitly: parameters freed after every action
    unless the rank's next step uses the same stage; all-gathered again for the next use,
    W included), still one reduce-scatter per step."""
    reports = run_distributed(run_composed, 4, ["dualpipev", "dualpipe", "1f1b"],
                              "fsdp-reshard", 2, timeout=240)
    _check_counts(reports, gather="per-use")
    for report in reports:
        for r in report:  # one all-gather per run of consecutive uses of a stage
            assert r["groups"] == len(r["num_actions"]), r  # one group per stage here
            training, inference = r["runs"]
            for counts in r["steps"]:
                gathers = sum(v for k, v in counts.items() if k[0].startswith("all_gather"))
                assert gathers == training, (r["schedule"], gathers, training)
            gathers = sum(v for k, v in r["inference"].items() if k[0].startswith("all_gather"))
            assert gathers == inference, (r["schedule"], gathers, inference)
            if r["schedule"] != "1f1b":  # two stages a rank: really resharded in between
                assert training > r["groups"], r


def _windows(log: list[tuple[str, int]]) -> tuple[dict[tuple[str, int], int],
                                                  list[tuple[int, int]]]:
    """Positions of the ``("start"|"end", step)`` marks, and ``(position, module)`` of
    every all-gather in ``log``."""
    marks = {e: i for i, e in enumerate(log) if e[0] != "ag"}
    gathers = [(i, m) for i, (kind, m) in enumerate(log) if kind == "ag"]
    return marks, gathers


def _check_order(r: dict[str, Any]) -> None:
    """Exactly one all-gather per stage a step adds to the previous step's, issued in
    that step's window: with prefetching after the step two before finished computing
    and before the previous step started computing (the step's own stages for the first
    step: before it starts); without, after the previous step finished computing (the
    first step's: during its compute, by FSDP2's hook)."""
    marks, gathers = _windows(r["log"])
    steps = r["steps"]
    expected = 0
    for k, now in enumerate(steps):
        before = set(steps[k - 1]) if k else set()
        for m in sorted(set(now) - before):
            expected += 1
            if r["prefetch"]:
                lo = marks[("end", k - 2)] if k >= 2 else -1
                hi = marks[("start", k - 1)] if k >= 1 else marks[("start", 0)]
            elif k == 0:
                lo, hi = marks[("start", 0)], marks[("end", 0)]
            else:
                lo, hi = marks[("end", k - 1)], marks[("start", k)]
            hits = [i for i, mm in gathers if mm == m and lo < i < hi]
            assert len(hits) == 1, (r["schedule"], r["prefetch"], k, m, r["log"])
    assert len(gathers) == expected, (r["schedule"], r["prefetch"], len(gathers), expected)


def test_reshard_prefetch_order() -> None:
    """reshard_after_forward=True under DualPipeV and DualPipe with the prefetch on (the
    default), and DualPipeV with it off: gradients exact, the same all-gathers (one per
    run of consecutive uses of a stage), each issued before the compute of the step ahead
    of its use with the prefetch on, and only after it with the prefetch off; none left
    on its way."""
    reports = run_distributed(run_prefetch_order, 4,
                              [("dualpipev", True), ("dualpipe", True), ("dualpipev", False)],
                              timeout=240)
    for report in reports:
        for r in report:
            assert r["worst"] <= 1e-5 and not r["pending"], r
            _check_order(r)
        on, _, off = report
        assert on["steps"] == off["steps"]
        assert sum(k == "ag" for k, _ in on["log"]) == sum(k == "ag" for k, _ in off["log"])
        # two stages a rank: some all-gather really ran ahead of another stage's step
        assert any(set(b) - set(a) for a, b in pairwise(on["steps"])), on["steps"]


def test_set_prefetch_needs_fsdp_stages() -> None:
    from torch import nn

    from dualpipe.integrations.fsdp import set_prefetch

    with pytest.raises(ValueError, match="no stage of this pipeline on this rank is wrapped"):
        set_prefetch(nn.Linear(2, 2), False)


def test_user_gradient_accumulation_without_sync() -> None:
    """The user's set_requires_gradient_sync(False) is honoured across pipeline steps: no
    reduction (and no .grad) in the first step, one reduce-scatter of both steps'
    gradients in the second."""
    reports = run_distributed(run_composed, 4, ["dualpipev", "1f1b"], "fsdp-nosync", 2,
                              timeout=240)
    for report in reports:
        for r in report:
            first, second = r["steps"]
            assert not any(k[0].startswith("reduce") for k in first), first
            assert sum(v for k, v in second.items() if k[0].startswith("reduce")) == \
                r["groups"], second
            for counts in (first, second):
                assert sum(v for k, v in counts.items() if k[0].startswith("all_gather")) \
                    == r["groups"], counts
            assert r["worst"] <= 1e-5, r


def test_replicate_one_all_reduce() -> None:
    reports = run_distributed(run_composed, 4, ["dualpipev", "dualpipe", "1f1b"], "replicate",
                              2, timeout=240)
    _check_counts(reports, gather="none", reduce=("all_reduce",))


def test_hsdp() -> None:
    """2 replicas x 2 shards x 2 pipeline ranks: per group and step one reduce-scatter over
    the shard group and one all-reduce over the replicas."""
    reports = run_distributed(run_composed, 8, ["dualpipev"], "hsdp", 2, 1, 2, timeout=300)
    _check_counts(reports, reduce=("reduce_scatter_single", "all_reduce"))


def test_tensor_parallel_stages() -> None:
    """Colwise/Rowwise DTensor stages on 2 pipeline x 2 tensor-parallel ranks (no data
    parallelism, so no extension) under the V, bidirectional and 1F1B schedules."""
    reports = run_distributed(run_composed, 4, ["dualpipev", "dualpipe", "zbv", "1f1b"],
                              "none", 1, 2, timeout=240)
    for report in reports:
        for r in report:
            assert r["groups"] == 0 and r["worst"] <= 1e-5, r


def test_tensor_parallel_stages_remaining_schedules() -> None:
    reports = run_distributed(run_composed, 4, ["v-half", "v-min", "interleaved-1f1b", "zb1p",
                                                "gpipe"], "none", 1, 2, timeout=240)
    for report in reports:
        for r in report:
            assert r["groups"] == 0 and r["worst"] <= 1e-5, r


def test_three_d_fsdp_tp_pp() -> None:
    """2 FSDP x 2 pipeline x 2 tensor-parallel ranks, DualPipeV and DualPipe."""
    reports = run_distributed(run_composed, 8, ["dualpipev", "dualpipe"], "fsdp", 2, 2,
                              timeout=300)
    _check_counts(reports)


def test_control_without_the_extension_is_wrong() -> None:
    """The check can fail: with the extension unregistered, FSDP2 reduce-scatters inside
    the input-only backwards and the deferred weight gradients leak."""
    reports = run_distributed(run_composed, 4, ["dualpipev"], "fsdp", 2, 1, 1, True, 2, True,
                              timeout=240)
    assert max(r["worst"] for report in reports for r in report) > 1e-2, reports


def test_refusals() -> None:
    messages = run_distributed(run_refusals, 4, timeout=120)
    assert all(len(m) == 4 for m in messages)


def test_failure_then_rebuild() -> None:
    reports = run_distributed(run_failure_then_rebuild, 4, timeout=180)
    assert all("boom" in r["message"] for r in reports), reports


def test_failure_with_prefetch_pending() -> None:
    """reshard_after_forward=True: the step fails while all-gathers started ahead are on
    their way (on some rank); the failure drops them (none left after), and a new
    pipeline over the same stages trains exactly."""
    reports = run_distributed(run_failure_then_rebuild, 4, True, timeout=180)
    assert all("boom" in r["message"] for r in reports), reports
    assert any(r["pending"][0] > 0 for r in reports), reports
    assert all(r["pending"][-1] == 0 for r in reports), reports
