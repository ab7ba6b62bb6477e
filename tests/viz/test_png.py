"""PNG rendering of timelines (matplotlib, imported lazily)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dualpipe import Costs, generate, simulate
from dualpipe.schedules import Op
from dualpipe.viz import TimedWait, render_png
from dualpipe.viz.png import COLORS

COSTS = Costs(f=1, b=2, w=1, fb=3)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    return width, height


def _colors(path: Path) -> set[str]:
    import matplotlib.image
    import numpy as np

    pixels = (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.int64)
    packed = np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2])
    return {f"#{int(v):06X}" for v in packed}


def test_dualpipe_png(tmp_path: Path) -> None:
    schedule = generate("dualpipe", 8, 20)
    result = simulate(schedule, COSTS)
    out = tmp_path / "dualpipe.png"
    render_png(result.timeline, schedule, out)
    width, height = _png_size(out)
    assert 1500 <= width <= 6000 and 300 <= height <= 1500
    assert width > 2 * height  # a wide timeline, one row per rank
    seen = _colors(out)
    # every kind appears in both directions' shades (DualPipe runs all four kinds both ways)
    for op in (Op.FORWARD, Op.BACKWARD, Op.INPUT, Op.WEIGHT):
        for shade in COLORS[op]:
            assert shade in seen, (op, shade)


def test_dualpipev_png_with_waits_and_title(tmp_path: Path) -> None:
    schedule = generate("dualpipev", 4, 10)
    result = simulate(schedule, Costs(f=1, b=2, w=1, fb=3, comm=0.5))
    waits = []
    for row in result.timeline:
        last, ws = 0.0, []
        for t in row:
            if t.start > last:
                ws.append(TimedWait(t.rank, f"recv {t.step}", last, t.start))
            last = t.end
        waits.append(ws)
    assert any(waits)
    out = tmp_path / "v.png"
    render_png(result.timeline, schedule, str(out), title="measured", waits=waits, time_unit="ms")
    width, height = _png_size(out)
    assert width > height > 200
    assert "#9A9A9A" in _colors(out)  # the grey wait bars


def test_more_ranks_make_a_taller_picture(tmp_path: Path) -> None:
    sizes = []
    for ranks in (2, 8):
        schedule = generate("1f1b", ranks, 16)
        out = tmp_path / f"r{ranks}.png"
        render_png(simulate(schedule, COSTS).timeline, schedule, out)
        sizes.append(_png_size(out))
    assert sizes[1][1] > sizes[0][1]


def test_missing_matplotlib_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.patches",
        "matplotlib.backends.backend_agg",
    ):
        monkeypatch.setitem(sys.modules, name, None)
    schedule = generate("1f1b", 2, 2)
    with pytest.raises(ImportError, match=r"needs matplotlib.*pip install"):
        render_png(simulate(schedule, COSTS).timeline, schedule, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_viz_and_cli_import_neither_torch_nor_matplotlib() -> None:
    code = (
        "import sys, dualpipe.viz, dualpipe.cli, dualpipe.__main__\n"
        "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_memory_rows_make_a_taller_picture_in_their_colour(tmp_path: Path) -> None:
    """Measured memory per rank is drawn as one more row per rank, in its own colour."""
    from dualpipe.viz.png import _MEMORY_FILL

    schedule = generate("dualpipev", 2, 4)
    timeline = simulate(schedule, COSTS).timeline
    memory = [[(t.end, float(k + 1)) for k, t in enumerate(row)] for row in timeline]
    plain, with_memory = tmp_path / "plain.png", tmp_path / "memory.png"
    render_png(timeline, schedule, plain)
    render_png(timeline, schedule, with_memory, memory=memory)
    assert _png_size(with_memory)[1] > _png_size(plain)[1]
    assert _MEMORY_FILL in _colors(with_memory)
    assert _MEMORY_FILL not in _colors(plain)
