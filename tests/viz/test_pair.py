"""The pair picture: compute row and communication row."""

from __future__ import annotations

from pathlib import Path

from dualpipe.cli import main
from dualpipe.partcosts import pair_intervals, parse_parts
from dualpipe.viz.pair import render_pair_png, render_pair_text


def test_text_shows_parts_on_two_rows() -> None:
    text = render_pair_text(pair_intervals(parse_parts("2,2,2", "2,2,2", "1,1")), width=40)
    compute, comm_f, comm_b, _axis = text.splitlines()
    assert compute.split("|")[1].startswith("B1") and "F0" in compute and "W1" in compute
    assert comm_b.split("|")[1].lstrip().startswith("B1>") and "F0>" in comm_f
    assert comm_f.index("F0>") > comm_b.index("B1>")  # launched after the backward's


def test_png_and_cli(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "pair.png"
    render_pair_png(pair_intervals(parse_parts("1,1,1", "1,1,1", "0,0")), out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    cli_png = tmp_path / "cli.png"
    assert main(["pair", "--part-f", "2,2,2", "--part-b", "2,2,2", "--part-w", "1,1",
                 "-o", str(cli_png)]) == 0
    assert cli_png.exists()
    printed = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "pair 10 vs F then B 14; communication 4, hidden 4" in printed
    assert main(["simulate", "dualpipev", "--ranks", "2", "--chunks", "4",
                 "--part-f", "2,2,2", "--part-b", "2,2,2"]) == 2
