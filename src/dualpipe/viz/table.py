"""The seed's comparison table, measured by simulation, with every other schedule as rows."""

from __future__ import annotations

import textwrap
from typing import Any

from ..errors import ScheduleError
from ..schedules.registry import generate, spec, specs
from ..simulation import Costs, seed_bubble, simulate

__all__ = ["compare_table", "format_compare_table", "COMPARED", "METHODS", "SEED_FORMULAS"]

SEED_FORMULAS: dict[str, tuple[str, str]] = {
    # schedule name: (bubble formula, activations formula) of the seed's table
    "1f1b": ("(PP-1)(F+B)", "PP"),
    "zb1p": ("(PP-1)(F+B-2W)", "PP"),
    "dualpipe": ("(PP/2-1)(F&B+B-3W)", "PP+1"),
    "dualpipev": ("(PP/2-1)(F&B+B-3W)", "PP+1"),
}
"""The seed table's formulas, for the rows it has."""

def compared() -> tuple[str, ...]:
    """Rows of the table, in order: the seed's four, then every other registered
    schedule marked for comparison, in registry order."""
    others = (s.name for s in specs() if s.compare and s.name not in SEED_FORMULAS)
    return (*SEED_FORMULAS, *others)


COMPARED: tuple[str, ...] = compared()
"""The default rows (see :func:`compared`)."""

METHODS = COMPARED
"""Same as :data:`COMPARED` (the name the table's rows had before)."""

_TOL = 1e-6


def _ranks(name: str, pp: int) -> int:
    """Ranks the schedule needs to hold ``pp`` stages (from its layout on 2 ranks)."""
    per_rank = spec(name).layout(2).num_stages / 2
    return int(pp / per_rank)


def _num(x: float) -> str:
    """Compact number: integers without decimals, others with at most 4 significant."""
    r = round(x, 6)
    return f"{r:.0f}" if r == int(r) else f"{r:.4g}"


def compare_table(
    num_stages: int, num_chunks: int, costs: Costs, names: tuple[str, ...] = COMPARED
) -> list[dict[str, Any]]:
    """Simulate every method of ``names`` for ``num_stages`` stages.

    Args:
        num_stages: pipeline stages ``PP`` (even, >= 2).
        num_chunks: micro-batches of one step, the same for every method. A method
            whose constraints this count (or its number of ranks) breaks is left out
            and named in the ``skipped`` key of the first row.
        costs: per-action times.
        names: registry names of the rows.

    Returns:
        One dict per method with keys ``method``, ``schedule``, ``stages``,
        ``devices``, ``num_chunks``, ``makespan``, ``bubble`` (simulated, max over
        ranks), ``bubble_formula`` (the seed formula's value, None where the seed has
        none), ``formula``, ``params_per_device``, ``activations`` (simulated peak),
        ``memory`` (simulated peak memory: activations plus deferred weight-gradient
        state, ``costs.w_memory`` per deferred ``W``),
        ``activations_formula`` (value or None), ``activations_formula_text``,
        ``costs`` and ``skipped`` (``[(name, reason)]`` of the left-out methods).

    Raises:
        ScheduleError: for an odd or too small ``num_stages``, or when no method fits.
    """
    pp = num_stages
    if not isinstance(pp, int) or pp < 2 or pp % 2:
        raise ScheduleError(f"compare: the number of stages must be even and >= 2, got {pp}")
    rows: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for name in names:
        entry = spec(name)
        try:
            schedule = generate(name, _ranks(name, pp), num_chunks)
        except ScheduleError as exc:
            skipped.append((entry.label, str(exc)))
            continue
        result = simulate(schedule, costs)
        layout = schedule.layout
        formula, act_text = SEED_FORMULAS.get(name, ("", ""))
        rows.append(
            {
                "method": entry.label,
                "schedule": name,
                "stages": pp,
                "devices": schedule.num_ranks,
                "num_chunks": schedule.num_chunks,
                "makespan": result.makespan,
                "bubble": max(result.bubble),
                "bubble_formula": seed_bubble(name, pp, costs),
                "formula": formula,
                "params_per_device": max(len(s) for s in layout.rank_stages),
                "activations": max(result.peak_activations),
                "memory": max(result.peak_memory),
                "activations_formula": (pp + 1 if act_text == "PP+1" else pp) if act_text else None,
                "activations_formula_text": act_text,
                "costs": {
                    "f": costs.f,
                    "b": costs.b,
                    "w": costs.w,
                    "fb": costs.pair,
                    "comm": costs.comm,
                    "w_memory": costs.w_memory,
                },
            }
        )
    if not rows:
        raise ScheduleError(
            "compare: no method fits these sizes: " + "; ".join(r for _, r in skipped)
        )
    rows[0]["skipped"] = skipped
    return rows


def _differs(row: dict[str, Any]) -> bool:
    formula = row["bubble_formula"]
    return formula is not None and abs(row["bubble"] - formula) > _TOL


def _differences(rows: list[dict[str, Any]]) -> list[str]:
    """Footnote lines naming the rows whose simulated bubble differs from the formula, and why."""
    differ = [r for r in rows if _differs(r)]
    if not differ:
        return []
    c = rows[0]["costs"]
    listed = ", ".join(
        f"{r['method']} ({_num(r['bubble'])} vs {_num(r['bubble_formula'])})" for r in differ
    )
    out = [f"* Simulation and seed formula differ for {listed}:"]
    if c["comm"] > 0:
        out.append(
            f"  - communication: the formulas leave it out; the simulation adds comm ="
            f" {_num(c['comm'])} to every message between ranks on the critical path."
        )
    ratios_off = abs(c["b"] - c["w"] - c["f"]) > _TOL or abs(c["w"] - c["f"]) > _TOL
    if ratios_off and any(r["schedule"] != "1f1b" for r in differ):
        out.append(
            "  - cost ratios: the ZB1P and DualPipe formulas are closed forms for the zero-bubble"
            f" setting F=B-W=W (here F = {_num(c['f'])}, B-W = {_num(c['b'] - c['w'])},"
            f" W = {_num(c['w'])}); with other ratios other steps of the schedule wait, and"
            " the simulation gives the bubble these exact schedules have."
        )
    if any(r["bubble_formula"] < 0 for r in differ):
        out.append("  - a negative formula value is below what any schedule can reach.")
    if len(out) == 1:
        out.append("  - the schedule's critical path is not the one the formula assumes.")
    return out


def format_compare_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`compare_table`'s rows as a Markdown table with footnotes."""
    if not rows:
        return ""
    first = rows[0]
    pp, chunks, c = first["stages"], first["num_chunks"], first["costs"]
    header = [
        "Method",
        "Bubble (sim)",
        "Bubble (seed)",
        "Seed formula",
        "Params/device",
        "Activations/device (sim)",
        "Activations (seed)",
        "Memory/device (sim)",
        "#Devices",
    ]
    body = []
    for row in rows:
        seeded = row["bubble_formula"] is not None
        mark = " *" if _differs(row) else ""
        act_formula = row["activations_formula"]
        act_mark = " *" if act_formula is not None and row["activations"] != act_formula else ""
        body.append(
            [
                row["method"],
                _num(row["bubble"]) + mark,
                _num(row["bubble_formula"]) if seeded else "—",
                row["formula"] or "—",
                f"{row['params_per_device']}×",
                f"{row['activations']}{act_mark}",
                f"{row['activations_formula_text']} = {act_formula}" if act_formula else "—",
                _num(row["memory"]),
                f"{row['devices']} ({'PP/2' if row['devices'] * 2 == pp else 'PP'})",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths, strict=True)) + " |"

    out = [
        f"PP = {pp} stages, {chunks} micro-batches per step; F = {_num(c['f'])}, "
        f"B = {_num(c['b'])}, W = {_num(c['w'])}, F&B = {_num(c['fb'])}, comm = {_num(c['comm'])}",
        "",
        line(header),
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *(line(r) for r in body),
        "",
        "Bubble (sim): simulated makespan minus busy time, maximum over ranks (1F1B, ZB1P and"
        " DualPipe on PP ranks, the two-stages-per-rank schedules on PP/2 ranks, all with the"
        " same micro-batches); '—': the seed's table has no such row.",
        "Units: parameters in one stage's parameters (1/PP of the model); activations = peak"
        " (micro-batch, stage) forward results held on one device awaiting their backward, in one"
        " stage's activations for one micro-batch. Every method cuts the model into the same PP"
        " stages, so a DualPipeV device, holding two of them, counts both in that unit: the"
        " simulator's peak_activations is used as is. Memory = peak activations plus the state"
        " deferred weight gradients hold between their I and their W, "
        f"{_w_text(c.get('w_memory', 0.0))} activation per deferred W (--w-memory), same unit.",
    ]
    out.extend(_differences(rows))
    for label, reason in first.get("skipped", []):
        out.append(f"* {label} left out: {reason}")
    for row in rows:
        formula = row["activations_formula"]
        if formula is not None and row["activations"] != formula:
            out.append(
                f"* {row['method']}: simulated peak activations {row['activations']} vs"
                f" {row['activations_formula_text']} = {row['activations_formula']}."
            )
    return "\n".join(_wrap(x) for x in out)


def _w_text(w_memory: Any) -> str:
    if isinstance(w_memory, (list, tuple)):
        return ",".join(_num(x) for x in w_memory)
    return _num(w_memory)


def _wrap(text: str, width: int = 100) -> str:
    """Wrap a footnote line (table lines and short lines are left alone)."""
    if text.startswith("|") or len(text) <= width:
        return text
    indent = "    " if text.startswith("  - ") else "  " if text.startswith("* ") else ""
    return textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False)
