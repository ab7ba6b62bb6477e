"""The registry: one place for every name, layout and constraint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dualpipe.errors import ScheduleError
from dualpipe.schedules import (
    SCHEDULES,
    dualpipe_layout,
    dualpipev_layout,
    generate,
    interleaved_layout,
    layout_for,
    linear_layout,
    schedule_names,
    spec,
    specs,
    validate,
)
from dualpipe.schedules.registry import register


def test_names_in_one_order_everywhere() -> None:
    names = schedule_names()
    assert names[:5] == ("dualpipe", "dualpipev", "1f1b", "zb1p", "gpipe")
    assert {"zbv", "interleaved-1f1b"} <= set(names)
    assert tuple(SCHEDULES) == names == tuple(s.name for s in specs())
    for s in specs():
        assert SCHEDULES[s.name] is s.generator
        assert s.label and s.description


def test_listing_order_does_not_depend_on_import_order() -> None:
    # a fresh interpreter that imports the generator modules in another order first
    code = (
        "import dualpipe.schedules.interleaved, dualpipe.schedules.zbv, "
        "dualpipe.schedules.controllable\n"
        "from dualpipe.schedules import SCHEDULES, schedule_names\n"
        "print(','.join(schedule_names())); print(','.join(SCHEDULES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == [",".join(schedule_names())] * 2


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("dualpipe", dualpipe_layout(4)),
        ("dualpipev", dualpipev_layout(4)),
        ("zbv", dualpipev_layout(4)),
        ("interleaved-1f1b", interleaved_layout(4, 2)),
        ("1f1b", linear_layout(4)),
    ],
)
def test_layouts(name: str, layout: object) -> None:
    assert layout_for(name, 4) == layout == spec(name).layout(4)
    assert generate(name, 4, 8).layout == layout


def test_even_ranks_is_checked_by_the_registry() -> None:
    dp = spec("dualpipe")
    assert dp.rank_multiple == 2 and dp.chunk_multiple == 2
    assert dp.constraints == "ranks even; ranks >= 2; micro-batches even"
    for call in (lambda: generate("dualpipe", 3, 6), lambda: layout_for("dualpipe", 3)):
        with pytest.raises(ScheduleError, match="dualpipe: the number of ranks must be even, got"):
            call()
    assert spec("DualPipeV").constraints == ""


def test_interleaved_rounds_constraint() -> None:
    # 10 micro-batches on 4 ranks: 2 rounds of 5; 9 do not split into 2 rounds
    generate("interleaved-1f1b", 4, 10)
    with pytest.raises(ScheduleError, match=r"multiple of the number of rounds .* = 2"):
        generate("interleaved-1f1b", 4, 9)
    assert "rounds" in spec("interleaved-1f1b").constraints


def test_unknown_name_lists_the_registry() -> None:
    with pytest.raises(ScheduleError, match="unknown schedule 'nope'; choose one of dualpipe, "):
        spec("nope")
    with pytest.raises(ScheduleError, match="unknown schedule"):
        layout_for("nope", 2)


def test_a_name_registers_once() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("zbv", label="x", layout=linear_layout, description="x")(SCHEDULES["zbv"])


@pytest.mark.parametrize("name", schedule_names())
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_every_schedule_is_sound_where_its_constraints_allow(name: str, ranks: int) -> None:
    entry = spec(name)
    for chunks in range(1, 3 * ranks + 2):
        try:
            entry.check(ranks, chunks)
        except ScheduleError:
            continue
        validate(generate(name, ranks, chunks))


def test_docs_list_every_schedule() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "schedules.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    for name in schedule_names():
        assert f"| `{name}` |" in docs, name
        assert f"`{name}`" in readme, name
