"""Tokens: printing, parsing, and the records they stand for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    SCHEDULES,
    Action,
    Op,
    Overlap,
    PairKind,
    Schedule,
    format_step,
    generate,
    layout_for,
    parse_step,
    step_actions,
)

# (name, num_ranks, num_chunks) small enough to be quick, covering every generator.
CASES = [
    ("dualpipe", 2, 4),
    ("dualpipe", 4, 10),
    ("dualpipe", 6, 16),
    ("dualpipev", 1, 2),
    ("dualpipev", 3, 7),
    ("1f1b", 1, 3),
    ("1f1b", 4, 9),
    ("zb1p", 3, 5),
    ("zb1p", 5, 4),
    ("gpipe", 3, 2),
    ("zbv", 3, 7),
    ("zbv", 4, 2),
    ("interleaved-1f1b", 3, 6),
    ("v-half", 3, 7),
    ("v-min", 4, 5),
]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("F0.3", Action(Op.FORWARD, 0, 3)),
        ("B1.0", Action(Op.BACKWARD, 1, 0)),
        ("I0.2", Action(Op.INPUT, 0, 2)),
        ("W1.4", Action(Op.WEIGHT, 1, 4)),
        ("F12.345", Action(Op.FORWARD, 12, 345)),
        ("F0.2+I1.0", Overlap(Action(Op.FORWARD, 0, 2), Action(Op.INPUT, 1, 0))),
        ("F1.7+B0.5", Overlap(Action(Op.FORWARD, 1, 7), Action(Op.BACKWARD, 0, 5))),
        ("F0.1+F0.2", Overlap(Action(Op.FORWARD, 0, 1), Action(Op.FORWARD, 0, 2))),
        ("I0.8+I0.9", Overlap(Action(Op.INPUT, 0, 8), Action(Op.INPUT, 0, 9))),
        ("B1.3+I0.2", Overlap(Action(Op.BACKWARD, 1, 3), Action(Op.INPUT, 0, 2))),
    ],
)
def test_parse_and_format_round_trip(token: str, expected: Action | Overlap) -> None:
    step = parse_step(token)
    assert step == expected
    assert format_step(step) == token
    assert str(step) == token
    assert parse_step(f"  {token}\n") == expected


@pytest.mark.parametrize(
    "token",
    [
        "",
        "F",
        "F0",
        "F0.",
        "F.1",
        "X0.1",
        "f0.1",
        "F-1.0",
        "F0.-1",
        "F0.1.2",
        "F0,1",
        "F 0.1",
        "F0.1+",
        "+B0.1",
        "F0.1+B0.2+B0.3",
        "F0.1+F0.1",  # an action with itself
        "F0.1+W0.2",  # a W never pairs
        "B0.1+F0.2",  # a forward and a backward: forward first
        "W0.1+B0.2",
        "I0.1+W0.1",
    ],
)
def test_bad_tokens_raise_value_error(token: str) -> None:
    with pytest.raises(ValueError):
        parse_step(token)


def test_schedule_error_is_a_value_error() -> None:
    assert issubclass(ScheduleError, ValueError)


def test_negative_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Action(Op.FORWARD, -1, 0)
    with pytest.raises(ValueError, match=">= 0"):
        Action(Op.BACKWARD, 0, -2)


def test_overlap_halves_are_checked() -> None:
    fwd, bwd = Action(Op.FORWARD, 0, 1), Action(Op.INPUT, 1, 0)
    with pytest.raises(ValueError, match="itself"):
        Overlap(bwd, bwd)
    with pytest.raises(ValueError, match="W does not pair"):
        Overlap(fwd, Action(Op.WEIGHT, 1, 0))
    with pytest.raises(ValueError, match="forward first"):
        Overlap(bwd, fwd)


def test_pair_kinds() -> None:
    f0, f1 = Action(Op.FORWARD, 0, 1), Action(Op.FORWARD, 1, 0)
    b, i = Action(Op.BACKWARD, 1, 0), Action(Op.INPUT, 0, 2)
    assert Overlap(f0, b).kind is PairKind.FB
    assert Overlap(f0, i).kind is PairKind.FB
    assert Overlap(f0, f1).kind is PairKind.FF
    assert Overlap(b, i).kind is PairKind.BB
    assert Overlap(i, b).kind is PairKind.BB


def test_op_kinds() -> None:
    assert [op.value for op in Op] == ["F", "B", "I", "W"]
    assert Op.BACKWARD.is_backward and Op.INPUT.is_backward
    assert not Op.FORWARD.is_backward and not Op.WEIGHT.is_backward


def test_step_actions_issue_order() -> None:
    pair = parse_step("F1.3+I0.2")
    assert step_actions(pair) == (Action(Op.FORWARD, 1, 3), Action(Op.INPUT, 0, 2))
    single = parse_step("W0.9")
    assert step_actions(single) == (Action(Op.WEIGHT, 0, 9),)


actions = st.builds(
    Action,
    st.sampled_from(list(Op)),
    st.integers(min_value=0, max_value=99),
    st.integers(min_value=0, max_value=999),
)
pairs = st.builds(
    Overlap,
    st.builds(
        Action,
        st.just(Op.FORWARD),
        st.integers(min_value=0, max_value=9),
        st.integers(min_value=0, max_value=999),
    ),
    st.builds(
        Action,
        st.sampled_from([Op.BACKWARD, Op.INPUT]),
        st.integers(min_value=0, max_value=9),
        st.integers(min_value=0, max_value=999),
    ),
)


@settings(max_examples=100, deadline=None)
@given(st.one_of(actions, pairs))
def test_any_step_round_trips(step: Action | Overlap) -> None:
    assert parse_step(format_step(step)) == step


@pytest.mark.parametrize(("name", "ranks", "chunks"), CASES)
def test_text_round_trip(name: str, ranks: int, chunks: int) -> None:
    schedule = generate(name, ranks, chunks)
    text = schedule.to_text()
    lines = text.splitlines()
    assert len(lines) == ranks
    assert all(line.startswith(f"rank {r}: ") for r, line in enumerate(lines))
    back = Schedule.from_text(text, layout_for(name, ranks), name=name)
    assert back == schedule
    assert back.chunks_per_stream == schedule.chunks_per_stream
    assert back.num_chunks == chunks
    explicit = Schedule.from_text(text, layout_for(name, ranks), schedule.chunks_per_stream, name)
    assert explicit == schedule


@pytest.mark.parametrize(("name", "ranks", "chunks"), CASES)
def test_dict_and_json_round_trip(name: str, ranks: int, chunks: int) -> None:
    import json

    schedule = generate(name, ranks, chunks)
    data = schedule.to_dict()
    assert data["name"] == name
    assert data["num_ranks"] == ranks
    assert data["num_chunks"] == chunks
    assert Schedule.from_dict(data) == schedule
    assert Schedule.from_dict(json.loads(schedule.to_json())) == schedule


def test_every_generator_is_covered() -> None:
    assert {name for name, _, _ in CASES} == set(SCHEDULES)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("rank 0: F0.0 B0.0\nrank 0: F0.0 B0.0", "ranks 0..1"),
        ("rank 0: F0.0 B0.0", "ranks 0..1"),
        ("rank 0: F0.0 B0.0\nrnk 1: F0.0 B0.0", "line 2"),
        ("rank 0: F0.0 B0.0\nrank 1 F0.0 B0.0", "line 2"),
        ("rank 0: F0.0 X0.0\nrank 1: F0.0 B0.0", "line 1"),
    ],
)
def test_from_text_rejects_malformed_text(text: str, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_text(text, layout_for("1f1b", 2))


def test_schedule_needs_one_list_per_rank() -> None:
    with pytest.raises(ScheduleError, match="2 rank lists for 3 ranks"):
        Schedule("custom", layout_for("gpipe", 3), 1, ((), ()))
