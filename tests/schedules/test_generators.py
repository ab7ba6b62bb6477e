"""Generators against the step tables of docs/schedules.md.

The expected token lists below were derived by hand from the step tables of
docs/schedules.md (not by running the generators); the structural tests re-read the
DualPipe / DualPipeV step table for many sizes.
"""

from __future__ import annotations

import pytest

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    SCHEDULES,
    Op,
    Overlap,
    Schedule,
    Step,
    dualpipe,
    dualpipev,
    generate,
    gpipe,
    one_f_one_b,
    step_actions,
    zb1p,
)


def rows(schedule: Schedule) -> list[str]:
    return [" ".join(str(s) for s in steps) for steps in schedule.steps]


# --------------------------------------------------------------------------- hand-derived


# DualPipe N=2: H=1, h=0 on both ranks, both are middle ranks (h = H-1), so the
# first pair of step 4 is split. Steps 1, 3, 5, 7 are empty (H-h-1 = 0); step 2 is
# F(0) F(1); step 4 has C-N+h+1 = C-1 repeats; step 6 is one repeat with m = 0,
# h even: B(1) full, B(0) zero-bubble; step 8 one W.
DUALPIPE_2_4 = "F0.0 F1.0 F0.1 B1.0 F1.1+B0.0 B1.1 I0.1 W0.1"
DUALPIPE_2_6 = "F0.0 F1.0 F0.1 B1.0 F1.1+B0.0 F0.2+B1.1 F1.2+B0.1 B1.2 I0.2 W0.2"

# DualPipe N=4, 8 micro-batches: C=4, H=2.
# Ranks 0 and 3 (h=0): 2x F(0); F(0) F(1); B*(1) W F(1); one FB(0,1) FB(1,0);
#   B(1) FB(1,0); step 6 (m=0, h even): B(1), B*(0); W B*(0); W.
# Ranks 1 and 2 (h=1, middle): 2x (F(0) F(1)); step 4 with 2 repeats, the first
#   pair split; step 6 (m=1): full B(1) B(0), then (h odd) B*(1) B*(0); W W.
DUALPIPE_4_8_OUTER = (
    "F0.0 F0.1 F0.2 F1.0 I1.0 W1.0 F1.1 F0.3+B1.1 F1.2+B0.0 B1.2 F1.3+B0.1 B1.3 I0.2 W0.2 I0.3 W0.3"
)
DUALPIPE_4_8_MIDDLE = (
    "F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 F1.2+B0.0 F0.3+B1.1 F1.3+B0.1 B1.2 B0.2 I1.3 I0.3 W1.3 W0.3"
)

# DualPipeV N=1: r=0 is the last rank (split first pair); step 4 has C-1 repeats.
DUALPIPEV_1_2 = "F0.0 F1.0 F0.1 B1.0 F1.1+B0.0 B1.1 I0.1 W0.1"
DUALPIPEV_1_3 = "F0.0 F1.0 F0.1 B1.0 F1.1+B0.0 F0.2+B1.1 F1.2+B0.1 B1.2 I0.2 W0.2"

# DualPipeV N=2: rank 0 like an outer DualPipe rank, rank 1 (last) like a middle one.
DUALPIPEV_2_4 = [DUALPIPE_4_8_OUTER, DUALPIPE_4_8_MIDDLE]
DUALPIPEV_2_5 = [
    # step 4 has C-2N+r+1 = 2 repeats on rank 0, 3 on rank 1
    "F0.0 F0.1 F0.2 F1.0 I1.0 W1.0 F1.1 F0.3+B1.1 F1.2+B0.0 F0.4+B1.2 F1.3+B0.1 "
    "B1.3 F1.4+B0.2 B1.4 I0.3 W0.3 I0.4 W0.4",
    "F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 F1.2+B0.0 F0.3+B1.1 F1.3+B0.1 F0.4+B1.2 F1.4+B0.2 "
    "B1.3 B0.3 I1.4 I0.4 W1.4 W0.4",
]

# 1F1B: rank r warms up with P-r-1 forwards, alternates F, B, then drains.
ONE_F_ONE_B_3_4 = [
    "F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 B0.2 B0.3",
    "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 B0.3",
    "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2 F0.3 B0.3",
]
ONE_F_ONE_B_2_3 = ["F0.0 F0.1 B0.0 F0.2 B0.1 B0.2", "F0.0 B0.0 F0.1 B0.1 F0.2 B0.2"]

# ZB1P (ZB-H1): the 1F1B order with input-only backwards; in the steady state rank
# r keeps r weight gradients deferred (the last rank, which sends gradients
# upstream first, defers the most); each drain I is followed by one W, and the
# W's still deferred fill the final bubble.
ZB1P_3_4 = [
    "F0.0 F0.1 F0.2 I0.0 W0.0 F0.3 I0.1 W0.1 I0.2 W0.2 I0.3 W0.3",
    "F0.0 F0.1 I0.0 F0.2 I0.1 W0.0 F0.3 I0.2 W0.1 I0.3 W0.2 W0.3",
    "F0.0 I0.0 F0.1 I0.1 F0.2 I0.2 W0.0 F0.3 I0.3 W0.1 W0.2 W0.3",
]
ZB1P_2_3 = [
    "F0.0 F0.1 I0.0 W0.0 F0.2 I0.1 W0.1 I0.2 W0.2",
    "F0.0 I0.0 F0.1 I0.1 W0.0 F0.2 I0.2 W0.1 W0.2",
]

GPIPE_2_3 = ["F0.0 F0.1 F0.2 B0.0 B0.1 B0.2"] * 2
GPIPE_3_2 = ["F0.0 F0.1 B0.0 B0.1"] * 3


@pytest.mark.parametrize(
    ("name", "ranks", "chunks", "expected"),
    [
        ("dualpipe", 2, 4, [DUALPIPE_2_4, DUALPIPE_2_4]),
        ("dualpipe", 2, 6, [DUALPIPE_2_6, DUALPIPE_2_6]),
        (
            "dualpipe",
            4,
            8,
            [DUALPIPE_4_8_OUTER, DUALPIPE_4_8_MIDDLE, DUALPIPE_4_8_MIDDLE, DUALPIPE_4_8_OUTER],
        ),
        ("dualpipev", 1, 2, [DUALPIPEV_1_2]),
        ("dualpipev", 1, 3, [DUALPIPEV_1_3]),
        ("dualpipev", 2, 4, DUALPIPEV_2_4),
        ("dualpipev", 2, 5, DUALPIPEV_2_5),
        ("1f1b", 3, 4, ONE_F_ONE_B_3_4),
        ("1f1b", 2, 3, ONE_F_ONE_B_2_3),
        ("zb1p", 3, 4, ZB1P_3_4),
        ("zb1p", 2, 3, ZB1P_2_3),
        ("gpipe", 2, 3, GPIPE_2_3),
        ("gpipe", 3, 2, GPIPE_3_2),
    ],
)
def test_hand_derived_lists(name: str, ranks: int, chunks: int, expected: list[str]) -> None:
    schedule = generate(name, ranks, chunks)
    assert schedule.name == name
    assert schedule.num_ranks == ranks and schedule.num_chunks == chunks
    assert rows(schedule) == expected


def test_named_functions_match_generate() -> None:
    for name, fn in [
        ("dualpipe", dualpipe),
        ("dualpipev", dualpipev),
        ("1f1b", one_f_one_b),
        ("zb1p", zb1p),
        ("gpipe", gpipe),
    ]:
        assert SCHEDULES[name] is fn
        assert fn(2, 8) == generate(name, 2, 8) == generate(name.upper(), 2, 8)


def test_one_f_one_b_with_fewer_micro_batches_than_ranks() -> None:
    # warm-up is capped by the number of micro-batches: min(P-r-1, chunks)
    assert rows(one_f_one_b(4, 2)) == [
        "F0.0 F0.1 B0.0 B0.1",  # warm-up min(3, 2) = 2
        "F0.0 F0.1 B0.0 B0.1",  # min(2, 2) = 2
        "F0.0 F0.1 B0.0 B0.1",  # 1 warm-up, one F B, one drain
        "F0.0 B0.0 F0.1 B0.1",
    ]


# ------------------------------------------------------------ the DualPipe(V) step table


def step_table(h: int, half: int, main: int, split: bool) -> list[tuple[int, list[str]]]:
    """The eight steps of docs/schedules.md as shapes (tokens without micro-batch ids;
    ``W`` for any W). ``h`` = distance to the nearer end (DualPipe) or ``r``
    (DualPipeV), ``half`` = H (DualPipe) or N (DualPipeV), ``main`` = step-4 repeats."""
    outer = half - h - 1
    m = (h + 1) // 2
    step4: list[str] = []
    for i in range(main):
        step4 += ["F0", "B1"] if (i == 0 and split) else ["F0+B1"]
        step4 += ["F1+B0"]
    step6: list[str] = []
    for j in range(h + 1):
        if j < m:
            step6 += ["B1", "B0"]
        elif j == m:
            step6 += ["I1", "I0"] if h % 2 else ["B1", "I0"]
        else:
            step6 += ["I1", "I0"]
    return [
        (1, ["F0"] * (2 * outer)),
        (2, ["F0", "F1"] * (h + 1)),
        (3, ["I1", "W", "F1"] * outer),
        (4, step4),
        (5, ["B1", "F1+B0"] * outer),
        (6, step6),
        (7, ["W", "I0"] * outer),
        (8, ["W"] * (h + 1)),
    ]


def shape(step: Step) -> str:
    if isinstance(step, Overlap):
        return f"{shape(step.first)}+{shape(step.second)}"
    return "W" if step.op is Op.WEIGHT else f"{step.op.value}{step.phase}"


def check_rank(steps: tuple[Step, ...], table: list[tuple[int, list[str]]], chunks: int) -> None:
    got = [shape(s) for s in steps]
    at = 0
    for number, want in table:
        assert got[at : at + len(want)] == want, f"step {number} (from index {at})"
        at += len(want)
    assert at == len(got), "steps after step 8"

    actions = [a for s in steps for a in step_actions(s)]
    for phase in (0, 1):
        fwd = [a.chunk for a in actions if a.op is Op.FORWARD and a.phase == phase]
        bwd = [a.chunk for a in actions if a.op.is_backward and a.phase == phase]
        assert fwd == list(range(chunks)), f"forward ids of phase {phase}"
        assert bwd == list(range(chunks)), f"backward ids of phase {phase}"
    inputs = [(a.phase, a.chunk) for a in actions if a.op is Op.INPUT]
    weights = [(a.phase, a.chunk) for a in actions if a.op is Op.WEIGHT]
    assert weights == inputs, "W runs the oldest deferred weight gradient (FIFO)"


def expected_counts(h: int, half: int, main: int, split: bool) -> dict[str, int]:
    """Per-kind step counts read off the table (pairs counted as steps)."""
    outer = half - h - 1
    m = (h + 1) // 2
    zb6 = 2 * (h - m) + (2 if h % 2 else 1)  # B* in step 6
    return {
        "pairs": (2 * main - int(split)) + outer,
        "I": outer + zb6 + outer,
        "W": outer + outer + (h + 1),
        "single F": 2 * outer + 2 * (h + 1) + outer + int(split),
        "single B": int(split) + outer + (2 * (h + 1) - zb6),
    }


def counts(steps: tuple[Step, ...]) -> dict[str, int]:
    singles = [s for s in steps if not isinstance(s, Overlap)]
    backs = [s.second for s in steps if isinstance(s, Overlap)] + singles
    return {
        "pairs": sum(isinstance(s, Overlap) for s in steps),
        "I": sum(a.op is Op.INPUT for a in backs),
        "W": sum(a.op is Op.WEIGHT for a in singles),
        "single F": sum(a.op is Op.FORWARD for a in singles),
        "single B": sum(a.op is Op.BACKWARD for a in singles),
    }


DUALPIPE_SIZES = [
    (n, chunks) for n in range(2, 9, 2) for chunks in range(2 * n, 4 * n + 3) if chunks % 2 == 0
]
DUALPIPEV_SIZES = [(n, chunks) for n in range(1, 9) for chunks in range(2 * n, 4 * n + 2)]


@pytest.mark.parametrize(("n", "chunks"), DUALPIPE_SIZES)
def test_dualpipe_follows_the_step_table(n: int, chunks: int) -> None:
    schedule = dualpipe(n, chunks)
    half, c = n // 2, chunks // 2
    assert schedule.chunks_per_stream == c
    for r in range(n):
        h = min(r, n - 1 - r)
        args = (h, half, c - n + h + 1, h == half - 1)  # split first pair on middle ranks
        check_rank(schedule.steps[r], step_table(*args), c)
        assert counts(schedule.steps[r]) == expected_counts(*args), f"rank {r}"
        # ranks r and N-1-r run the same list (their phases name mirrored stages)
        assert schedule.steps[r] == schedule.steps[n - 1 - r]


@pytest.mark.parametrize(("n", "chunks"), DUALPIPEV_SIZES)
def test_dualpipev_follows_the_step_table(n: int, chunks: int) -> None:
    schedule = dualpipev(n, chunks)
    assert schedule.chunks_per_stream == chunks
    for r in range(n):
        args = (r, n, chunks - 2 * n + r + 1, r == n - 1)  # split first pair on the last rank
        check_rank(schedule.steps[r], step_table(*args), chunks)
        assert counts(schedule.steps[r]) == expected_counts(*args), f"rank {r}"


@pytest.mark.parametrize(
    ("h", "expected"),
    [
        # step 6 of rank h, read directly from the text: m = (h+1)//2
        (0, "B1 I0"),  # m=0, h even: B(1) full, B(0) zero-bubble
        (1, "B1 B0 I1 I0"),  # m=1, h odd: both zero-bubble in repeat 1
        (2, "B1 B0 B1 I0 I1 I0"),  # m=1, h even
        (3, "B1 B0 B1 B0 I1 I0 I1 I0"),  # m=2, h odd
        (4, "B1 B0 B1 B0 B1 I0 I1 I0 I1 I0"),  # m=2, h even
    ],
)
def test_step_six_zero_bubble_rule(h: int, expected: str) -> None:
    # DualPipeV rank r = h on N = h+1 ranks has exactly h+1 step-6 repeats, which
    # follow the step-5 list: find them as the backward-only run before step 7/8.
    n = h + 1
    schedule = dualpipev(n, 2 * n)
    steps = schedule.steps[h]  # last rank: steps 1, 3, 5, 7 are empty
    tail = [shape(s) for s in steps if not isinstance(s, Overlap)][-(3 * (h + 1)) : -(h + 1)]
    assert " ".join(tail) == expected
    # DualPipe rank h of N = 2(h+1) ranks is a middle rank with the same step 6
    dp = dualpipe(2 * n, 4 * n)
    tail = [shape(s) for s in dp.steps[h] if not isinstance(s, Overlap)][-(3 * (h + 1)) : -(h + 1)]
    assert " ".join(tail) == expected


def test_split_first_pair_only_where_the_table_says() -> None:
    dp = dualpipe(8, 16)  # middle ranks 3 and 4
    for r in range(8):
        first_b = next(
            i for i, s in enumerate(dp.steps[r]) if isinstance(s, Overlap) or s.op.is_backward
        )
        step = dp.steps[r][first_b]
        h = min(r, 7 - r)
        if h == 3:
            assert str(step) == "B1.0" and str(dp.steps[r][first_b - 1]) == "F0.4"
        else:
            # outer ranks start backwards with step 3's B*(1); h=0..2 have H-h-1 > 0
            assert str(step) == "I1.0"
    dpv = dualpipev(4, 8)
    for r in range(4):
        firsts = [s for s in dpv.steps[r] if isinstance(s, Overlap) or s.op.is_backward]
        if r == 3:
            assert str(firsts[0]) == "B1.0" and str(firsts[1]) == "F1.4+B0.0"
        else:
            assert str(firsts[0]) == "I1.0"


def test_seed_picture_sizes() -> None:
    """DualPipe 8 ranks / 20 micro-batches and DualPipeV 4 ranks / 10 micro-batches,
    the sizes of the seed's figures: per-rank step counts from the table."""
    # Steps 1..8 hold 2o, 2(h+1), 3o, 2k+s, 2o, 2(h+1), 2o, h+1 list entries, with
    # o = H-h-1 (N-r-1 for DualPipeV), k = step-4 repeats, s = 1 on a split rank:
    # 9o + 5(h+1) + 2k + s. DualPipe N=8, C=10: k = 3+h; DualPipeV N=4, C=10: k = 3+r.
    # h=0: 27+5+6 = 38; h=1: 18+10+8 = 36; h=2: 9+15+10 = 34; h=3: 0+20+12+1 = 33.
    dp = dualpipe(8, 20)
    assert [len(s) for s in dp.steps] == [38, 36, 34, 33, 33, 34, 36, 38]
    dpv = dualpipev(4, 10)
    assert [len(s) for s in dpv.steps] == [38, 36, 34, 33]


# ------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("name", "ranks", "chunks", "match"),
    [
        ("dualpipe", 3, 6, "number of ranks must be even"),
        ("dualpipe", 5, 20, "number of ranks must be even"),
        ("dualpipe", 4, 9, "num_chunks must be even"),
        ("dualpipe", 2, 3, "num_chunks must be even"),
    ],
)
def test_bidirectional_constraints(name: str, ranks: int, chunks: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        generate(name, ranks, chunks)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize(("ranks", "chunks", "what"), [(0, 8, "ranks"), (-2, 8, "ranks")])
def test_non_positive_ranks(name: str, ranks: int, chunks: int, what: str) -> None:
    with pytest.raises(ScheduleError, match=f"{what} must be a positive integer, got {ranks}"):
        generate(name, ranks, chunks)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("chunks", [0, -4])
def test_non_positive_chunks(name: str, chunks: int) -> None:
    with pytest.raises(ScheduleError, match=f"chunks must be a positive integer, got {chunks}"):
        generate(name, 2, chunks)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("bad", [2.0, True, "4"])
def test_non_integer_arguments(name: str, bad: object) -> None:
    with pytest.raises(ScheduleError, match="must be a positive integer"):
        generate(name, bad, 8)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="must be a positive integer"):
        generate(name, 2, bad)  # type: ignore[arg-type]


def test_unknown_name() -> None:
    with pytest.raises(ScheduleError, match=r"unknown schedule 'interleaved'.*dualpipe"):
        generate("interleaved", 4, 8)
