"""Execution plans: routes and receive posting derived once from the schedule."""

from __future__ import annotations

from dualpipe.runtime.plan import Route, build_plan
from dualpipe.schedules.actions import Action, Op
from dualpipe.schedules.generators import generate


def test_dualpipev_routes() -> None:
    schedule = generate("dualpipev", 2, 4)
    by_action = {a.action: a for a in build_plan(schedule, 1, True, True).actions}
    f0 = by_action[Action(Op.FORWARD, 0, 0)]  # S1: from rank 0, then the V's turn (local)
    assert (f0.source, f0.sink, f0.sink_key) == (Route.MESSAGE, Route.LOCAL, (False, 0, 1, 0))
    assert [m.header for m in f0.recvs] == [True, False] and f0.sends == ()
    f1 = by_action[Action(Op.FORWARD, 1, 0)]  # S2: from the turn, on to rank 0
    assert (f1.source, f1.sink, f1.source_key) == (Route.LOCAL, Route.MESSAGE, (False, 0, 1, 0))
    assert [m.header for m in f1.sends] == [True, False]
    assert not by_action[Action(Op.FORWARD, 1, 1)].header_send  # one header per boundary
    rank0 = {a.action: a for a in build_plan(schedule, 0, True, True).actions}
    assert (rank0[Action(Op.FORWARD, 0, 0)].source, rank0[Action(Op.FORWARD, 1, 0)].sink) == (
        Route.DATA, Route.LOSS)
    w = [a for a in rank0.values() if a.action.op is Op.WEIGHT]
    assert w and all((a.source, a.sink) == (Route.NONE, Route.NONE) for a in w)


def test_steps_pairs_and_receive_posting() -> None:
    schedule = generate("dualpipev", 2, 6)
    plan = build_plan(schedule, 0, True, True, lookahead=2)
    assert [str(s.label) for s in plan.steps] == [str(s) for s in schedule.steps[0]]
    assert {s.kind.value for s in plan.steps} == {"F", "B", "I", "W", "pair"}
    start = 0
    for step in plan.steps:
        # every message a step needs is due by then, and due counts only grow
        for a in step.actions:
            assert all(plan.index[m] < step.due for m in a.recvs)
        assert step.due >= start
        start = step.due
    last_recv = max(k for k, op in enumerate(plan.ops) if not op.send)
    assert start == last_recv + 1


def test_issue_order_is_one_global_order() -> None:
    # each rank issues its operations in the order of one list shared by all ranks:
    # stamps first, and for every pair of ranks both sides list their common
    # operations identically (a send on one side is the receive on the other)
    schedule = generate("dualpipe", 4, 8)
    plans = [build_plan(schedule, r, True, True) for r in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            mine = [(op.send, op.message) for op in plans[a].ops if op.peer == b]
            theirs = [(not op.send, op.message) for op in plans[b].ops if op.peer == a]
            assert mine == theirs
    for plan in plans:
        stamps = [k for k, op in enumerate(plan.ops) if op.message is None]
        assert stamps == list(range(len(stamps))) and stamps
        sends = {m for a in plan.actions for m in a.sends}
        recvs = {m for a in plan.actions for m in a.recvs}
        assert {op.message for op in plan.ops if op.message and op.send} == sends
        assert {op.message for op in plan.ops if op.message and not op.send} == recvs


def test_inference_plan_has_forwards_only_and_no_headers_when_shapes_known() -> None:
    schedule = generate("dualpipe", 4, 8)
    plan = build_plan(schedule, 1, training=False, headers=False)
    assert {s.kind.value for s in plan.steps} == {"F"}
    assert not any(m.header or m.grad for m in plan.messages)
