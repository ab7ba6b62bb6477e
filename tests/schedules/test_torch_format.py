"""PyTorch's action format: our schedules out and back, PyTorch's own files in."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.distributed.pipelining.schedules import _Action, _validate_schedule

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    Schedule,
    dualpipev_layout,
    from_torch_actions,
    from_torch_csv,
    generate,
    interleaved_layout,
    linear_layout,
    to_torch_actions,
    to_torch_csv,
    validate,
)
from dualpipe.schedules.torch_format import layout_from_stage_ranks

from .torch_orders import dump_csv, zbv_rows

SINGLE_STREAM = [
    ("dualpipev", 3, 7),
    ("zbv", 3, 5),
    ("interleaved-1f1b", 3, 6),
    ("1f1b", 4, 6),
    ("zb1p", 3, 4),
    ("gpipe", 2, 3),
]


def test_tokens_are_torch_strings() -> None:
    # DualPipeV on 2 ranks, 4 micro-batches: stages r and 3-r; a pair is OVERLAP_F_B
    rows = to_torch_actions(generate("dualpipev", 2, 4))
    assert rows[0][:4] == ["0F0", "0F1", "0F2", "3F0"]
    assert rows[0][4:6] == ["3I0", "3W0"]
    assert "(0F3;3B1)OVERLAP_F_B" in rows[0]
    for row in rows:  # PyTorch parses every cell back to the same string
        assert [str(_Action.from_str(cell)) for cell in row] == row


@pytest.mark.parametrize(("name", "ranks", "chunks"), SINGLE_STREAM)
def test_round_trips(name: str, ranks: int, chunks: int) -> None:
    schedule = generate(name, ranks, chunks)
    back = from_torch_actions(to_torch_actions(schedule))  # layout inferred
    assert back.layout == schedule.layout and back.steps == schedule.steps
    csv_back = from_torch_csv(to_torch_csv(schedule), schedule.layout, chunks, name)
    assert csv_back == schedule


@pytest.mark.parametrize(("name", "ranks", "chunks"), [("zbv", 4, 8), ("1f1b", 3, 5)])
def test_pytorch_accepts_our_export(name: str, ranks: int, chunks: int) -> None:
    schedule = generate(name, ranks, chunks)
    actions = {r: [_Action.from_str(c) for c in row]
               for r, row in enumerate(to_torch_actions(schedule))}
    mapping = _validate_schedule(actions, ranks, schedule.layout.num_stages, chunks)
    for rank, stages in enumerate(schedule.layout.rank_stages):
        assert all(mapping[s] == rank for s in stages)


def test_pytorch_dumped_zbv_imports_and_validates(tmp_path: Path) -> None:
    path = tmp_path / "zbv.csv"
    dump_csv(zbv_rows(4, 6), str(path))  # PyTorch's _dump_csv, idle slots as empty cells
    text = path.read_text()
    assert ",," in text or text.startswith(",")  # the rows do have idle slots
    schedule = from_torch_csv(text, name="torch-zbv")
    assert schedule.layout == dualpipev_layout(4)
    validate(schedule)
    assert schedule.steps == generate("zbv", 4, 6).steps


def test_communication_actions_are_skipped() -> None:
    rows = [["0F0", "0SEND_F0", "0RECV_B0", "0B0"], ["1RECV_F0", "1F0", "1B0", "1SEND_B0"]]
    schedule = from_torch_actions(rows)
    assert schedule.layout == linear_layout(2)
    assert schedule.to_text() == "rank 0: F0.0 B0.0\nrank 1: F0.0 B0.0"


def test_inferred_layouts() -> None:
    assert layout_from_stage_ranks([0, 1, 2, 2, 1, 0]) == dualpipev_layout(3)
    assert layout_from_stage_ranks([0, 1, 0, 1, 0, 1]) == interleaved_layout(2, 3)


def test_dualpipe_cannot_be_exported() -> None:
    with pytest.raises(ScheduleError, match="2 streams"):
        to_torch_actions(generate("dualpipe", 2, 4))


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([["0F0", "0X1"]], "not a compute action"),
        ([["0F0"], ["0B0"]], "stage 0 appears on ranks 0 and 1"),
        ([["(0B0;1F0)OVERLAP_F_B"]], "forward then a backward"),
        ([["0F0", "2F0"]], r"stages \[0, 2\], not 0..1"),
    ],
)
def test_bad_rows(rows: list[list[str]], match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        from_torch_actions(rows)


def test_import_onto_a_given_layout_checks_stages() -> None:
    with pytest.raises(ScheduleError, match="rank 0 holds no stage 3"):
        from_torch_actions([["3F0"], ["1F0"]], linear_layout(2))
    assert isinstance(from_torch_actions([["0F0", "0B0"]], linear_layout(1)), Schedule)
