"""The dependency rule, on the V layout (hand-checked)."""

from __future__ import annotations

from dualpipe.schedules import Action, Op, dependency, dualpipev_layout, interleaved_layout


def act(token: str) -> Action:
    op, rest = token[0], token[1:]
    phase, chunk = rest.split(".")
    return Action(Op(op), int(phase), int(chunk))


def test_rule_on_the_v() -> None:
    layout = dualpipev_layout(3)  # path: r0p0 r1p0 r2p0 r2p1 r1p1 r0p1
    assert dependency(layout, 0, act("F0.4")) is None  # inputs
    dep = dependency(layout, 1, act("F0.4"))
    assert dep is not None and (dep.op, dep.position, dep.chunk) == (Op.FORWARD, (0, 0), 4)
    dep = dependency(layout, 2, act("F1.2"))  # the turn: same rank, phase 0
    assert dep is not None and (dep.op, dep.position, dep.rank) == (Op.FORWARD, (2, 0), 2)
    dep = dependency(layout, 1, act("I0.1"))  # backward needs the next stage's backward
    assert dep is not None and (dep.op, dep.position, dep.key) == (Op.BACKWARD, (2, 0), (0, 2, 1))
    dep = dependency(layout, 0, act("B1.0"))  # last stage: its own forward (the loss)
    assert dep is not None and (dep.op, dep.position, dep.index) == (Op.FORWARD, (0, 1), 5)
    dep = dependency(layout, 2, act("W1.3"))  # W needs its I
    assert dep is not None and (dep.op, dep.position, dep.chunk) == (Op.INPUT, (2, 1), 3)


def test_rule_on_the_loop() -> None:
    layout = interleaved_layout(2, 2)  # path: r0p0 r1p0 r0p1 r1p1
    dep = dependency(layout, 0, act("F1.0"))
    assert dep is not None and dep.position == (1, 0)
    dep = dependency(layout, 1, act("B0.0"))
    assert dep is not None and (dep.op, dep.position) == (Op.BACKWARD, (0, 1))
