"""The seed's comparison table, measured by simulation."""

from __future__ import annotations

import pytest

from dualpipe import Costs, ScheduleError
from dualpipe.viz import compare_table, format_compare_table
from dualpipe.viz.table import COMPARED

DEFAULT = Costs(f=1, b=2, w=1, fb=3, comm=0)


@pytest.mark.parametrize(("pp", "chunks"), [(2, 4), (4, 8), (6, 20), (8, 20), (8, 32)])
def test_simulated_bubbles_and_memory_match_the_seed_for_default_costs(
    pp: int, chunks: int
) -> None:
    rows = compare_table(pp, chunks, DEFAULT)[:4]  # the seed's rows
    assert [r["method"] for r in rows] == ["1F1B", "ZB1P", "DualPipe", "DualPipeV"]
    expected_bubble = {
        "1F1B": (pp - 1) * 3,
        "ZB1P": (pp - 1) * 1,
        "DualPipe": (pp / 2 - 1) * 2,
        "DualPipeV": (pp / 2 - 1) * 2,
    }
    for row in rows:
        assert row["bubble"] == pytest.approx(row["bubble_formula"])
        assert row["bubble"] == pytest.approx(expected_bubble[row["method"]])
        assert row["activations"] == row["activations_formula"]
        assert row["num_chunks"] == chunks
    assert [r["params_per_device"] for r in rows] == [1, 1, 2, 2]
    assert [r["activations"] for r in rows] == [pp, pp, pp + 1, pp + 1]
    assert [r["devices"] for r in rows] == [pp, pp, pp, pp // 2]


def test_formatted_table() -> None:
    text = format_compare_table(compare_table(8, 20, DEFAULT))
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(COMPARED)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert cells[0] == ["1F1B", "21", "21", "(PP-1)(F+B)", "1×", "8", "PP = 8", "8", "8 (PP)"]
    assert cells[1] == ["ZB1P", "7", "7", "(PP-1)(F+B-2W)", "1×", "8", "PP = 8", "8", "8 (PP)"]
    assert cells[2] == [
        "DualPipe", "6", "6", "(PP/2-1)(F&B+B-3W)", "2×", "9", "PP+1 = 9", "9", "8 (PP)"
    ]
    assert cells[3] == [
        "DualPipeV",
        "6",
        "6",
        "(PP/2-1)(F&B+B-3W)",
        "2×",
        "9",
        "PP+1 = 9",
        "9",
        "4 (PP/2)",
    ]
    # rows the seed has no formula for: ZBV's F = I = W bubble is 3 on 4 ranks
    # (tests/schedules/test_zbv.py); interleaved 1F1B's is (N-1)(F+B) = 9 on 4 ranks,
    # with v = 2 half-size stages per rank
    assert cells[4] == ["ZBV", "3", "—", "—", "2×", "8", "—", "8", "4 (PP/2)"]
    # V-Half and V-Min: tests/schedules/test_controllable.py (12 and 11 idle slots at
    # F = I = W on 4 ranks from their building blocks' warm-up and cool-down)
    assert cells[5] == ["V-Half", "12", "—", "—", "2×", "6", "—", "6", "4 (PP/2)"]
    assert cells[6] == ["V-Min", "11", "—", "—", "2×", "4", "—", "4", "4 (PP/2)"]
    assert cells[7] == ["Interleaved 1F1B", "9", "—", "—", "2×", "11", "—", "11", "4 (PP/2)"]
    assert "Units:" in text and "DualPipeV" in text
    # memory: activations plus deferred W state (1 activation each by default); at 1.5
    # ZBV's last rank and ZB1P keep several W's pending at their activation peak
    heavier = format_compare_table(compare_table(8, 20, Costs(w_memory=1.5)))
    memory = {c[0]: c[7] for c in ([x.strip() for x in line.strip("|").split("|")]
                                   for line in heavier.splitlines()[4:12])}
    assert (memory["ZB1P"], memory["ZBV"], memory["DualPipeV"]) == ("12", "10.5", "9")
    assert "differ" not in text  # nothing to explain with the default costs
    assert all(len(line) <= 100 for line in lines if not line.startswith("|"))


def test_differences_are_footnoted() -> None:
    rows = compare_table(4, 8, Costs(f=1, b=2, w=1, fb=3, comm=0.5))[:4]
    assert all(r["bubble"] > r["bubble_formula"] for r in rows)
    text = format_compare_table(rows)
    assert "* Simulation and seed formula differ for 1F1B" in text
    assert "communication" in text and "comm = 0.5" in text
    rows = compare_table(4, 8, Costs(f=1, b=3, w=1, fb=3))
    text = format_compare_table(rows)
    assert [r["bubble"] == pytest.approx(r["bubble_formula"]) for r in rows[:4]] == [
        True,
        True,
        False,
        False,
    ]
    assert "differ for DualPipe (2 vs 3), DualPipeV (2 vs 3)" in text
    assert "cost ratios" in text and "communication" not in text


@pytest.mark.parametrize(
    ("pp", "chunks", "match"),
    [
        (7, 20, "even"),
        (0, 20, "even"),
        (4, 0, "no method fits.*positive integer"),
    ],
)
def test_bad_arguments(pp: int, chunks: int, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        compare_table(pp, chunks, DEFAULT)


def test_methods_that_do_not_fit_are_left_out_and_named() -> None:
    rows = compare_table(8, 9, DEFAULT)  # odd: no DualPipe; 9 is no multiple of 2 rounds
    assert "DualPipe" not in [r["method"] for r in rows]
    assert "Interleaved 1F1B" not in [r["method"] for r in rows]
    text = format_compare_table(rows)
    assert "* DualPipe left out: dualpipe: num_chunks must be even, got 9" in text
    assert "* Interleaved 1F1B left out:" in text
    assert [r["num_chunks"] for r in rows] == [9] * len(rows)
