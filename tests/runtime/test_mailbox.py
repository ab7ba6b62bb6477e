"""The issue order: every rank issues its sends and receives in the plan's order, and
that order cannot deadlock NCCL (which runs each rank's operations strictly in issue
order) for any schedule the package generates.

* The model (:mod:`issue_model`) runs the mailbox's issuing rules against NCCL's rule
  for every registered schedule, 1-8 ranks and 1-32 micro-batches, training and
  inference.
* The executor itself runs on the in-process transport playing NCCL
  (``LocalNetwork(in_order=...)``): what each rank issued is recorded and must be the
  plan's order exactly, with no operation paired with the wrong message, and the
  results equal the single-process model's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualpipe.errors import ScheduleError
from dualpipe.runtime.plan import build_plan, build_plans
from dualpipe.schedules.generators import generate
from dualpipe.schedules.registry import SCHEDULES, spec
from dualpipe.transport.local import LocalNetwork
from dualpipe.transport.protocol import STAMP_SEQ, wire_tag

from .issue_model import run_in_order
from .test_executor import _step


def _sizes(name: str):
    for ranks in range(1, 9):
        for chunks in range(1, 33):
            try:
                spec(name).check(ranks, chunks)
            except ScheduleError:
                continue
            yield ranks, chunks


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_issue_order_cannot_deadlock_nccl(name: str) -> None:
    checked = 0
    for ranks, chunks in _sizes(name):
        schedule = generate(name, ranks, chunks)
        for training in (True, False):
            finished, heads = run_in_order(build_plans(schedule, training, headers=True))
            assert finished, f"{name} {ranks}x{chunks} training={training} stuck at {heads}"
            checked += 1
    assert checked >= 2 * 8  # at least every rank count once


def test_model_finds_a_deadlocking_order() -> None:
    # both ranks receive their stamp before sending theirs: each waits for the other
    plans = build_plans(generate("dualpipev", 2, 2), True, headers=True)
    swapped = []
    for plan in plans:
        stamps = [op for op in plan.ops if op.message is None]
        stamps.sort(key=lambda op: op.send)  # receive first
        ops = (*stamps, *plan.ops[len(stamps):])
        swapped.append(dataclasses.replace(plan, ops=ops))
    finished, heads = run_in_order(swapped)
    assert not finished
    assert sorted(heads) == ["rank 0: recv stamp from 1", "rank 1: recv stamp from 0"]


def _expected_issue(plan) -> list[tuple[int, bool, int]]:  # noqa: ANN001
    return [(op.peer, op.send, wire_tag(0, 0, STAMP_SEQ if op.message is None
                                         else op.message.seq)) for op in plan.ops]


@pytest.mark.parametrize(
    "name,ranks,chunks,per",
    [("dualpipev", 4, 10, "rank"), ("dualpipe", 4, 6, "rank"), ("dualpipe", 8, 8, "peer"),
     ("dualpipev", 8, 32, "peer"), ("zbv", 3, 7, "rank"), ("zb1p", 4, 5, "rank"),
     ("1f1b", 4, 6, "peer"), ("gpipe", 3, 4, "rank"), ("v-half", 4, 8, "rank"),
     ("v-min", 4, 8, "rank"), ("interleaved-1f1b", 2, 4, "rank")],
)
def test_executor_issues_in_plan_order_under_nccl_rules(name: str, ranks: int, chunks: int,
                                                         per: str) -> None:
    for training in (True, False):
        network = LocalNetwork(ranks, timeout=10.0, in_order=per)
        results, (ref_losses, ref_outs), (_, _, layout), _ = _step(
            name, ranks, chunks, "mlp", training=training, network=network)
        assert network.violations == []
        schedule = generate(name, ranks, chunks)
        for rank in range(ranks):
            plan = build_plan(schedule, rank, training, headers=True)
            assert network.issued[rank] == _expected_issue(plan)
            ends = layout.streams_ending_on(rank)
            if ends:
                assert torch.equal(torch.cat([o[0] for o in results[rank].outputs]),
                                   torch.cat(ref_outs[ends[0]]))
                if training:
                    assert torch.equal(torch.stack(results[rank].losses),
                                       torch.stack(ref_losses[ends[0]]))
        assert network.unmatched == 0


def test_in_order_network_pairs_heads_and_reports_wrong_pairs() -> None:
    network = LocalNetwork(2, timeout=1.0, in_order="peer")
    a, b = network.transport(0), network.transport(1)
    # rank 0 sends tags 1 then 2; rank 1 receives 2 first: NCCL would pair 1 with 2
    out = [torch.ones(1), torch.full((1,), 2.0)]
    bufs = [torch.zeros(1), torch.zeros(1)]
    a.send([out[0]], 1, 1)
    a.send([out[1]], 1, 2)
    first = b.recv([bufs[1]], 0, 2)
    second = b.recv([bufs[0]], 0, 1)
    assert first.error is not None and second.error is not None
    assert len(network.violations) == 2 and "NCCL would pair" in network.violations[0]


def test_in_order_network_holds_operations_behind_the_head() -> None:
    network = LocalNetwork(2, timeout=1.0, in_order="rank")
    a, b = network.transport(0), network.transport(1)
    # both ranks receive first: neither send can start (NCCL would hang)
    r0 = a.recv([torch.zeros(1)], 1, 5)
    r1 = b.recv([torch.zeros(1)], 0, 6)
    s0 = a.send([torch.ones(1)], 1, 6)
    s1 = b.send([torch.ones(1)], 0, 5)
    assert not any(p.done for p in (r0, r1, s0, s1))
    assert sorted(network.heads()) == [f"rank 0: recv from 1 tag {a.tag(5):#x}",
                                       f"rank 1: recv from 0 tag {b.tag(6):#x}"]
    # the same four operations issued sends first complete
    network = LocalNetwork(2, timeout=1.0, in_order="rank")
    a, b = network.transport(0), network.transport(1)
    ops = [a.send([torch.ones(1)], 1, 6), b.recv([torch.zeros(1)], 0, 6),
           b.send([torch.ones(1)], 0, 5), a.recv([torch.zeros(1)], 1, 5)]
    assert all(p.done and p.error is None for p in ops) and network.heads() == []
