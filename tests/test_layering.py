"""The package's layering, read from its imports (``TYPE_CHECKING`` ones included: they
are the design's dependencies even when free at run time). docs/architecture.md draws it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dualpipe

ROOT = Path(dualpipe.__file__).parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors", ("dualpipe.errors",)),
    ("schedules", ("dualpipe.schedules",)),
    ("analysis", ("dualpipe.partcosts", "dualpipe.simulation", "dualpipe.pairing", "dualpipe.viz",
                  "dualpipe.measured", "dualpipe.autoschedule")),
    ("autograd", ("dualpipe.autograd",)),
    ("transport", ("dualpipe.transport",)),
    ("runtime", ("dualpipe.runtime",)),
    ("plug-ins", ("dualpipe.overlap", "dualpipe.integrations")),
    ("helpers", ("dualpipe.utils", "dualpipe.split", "dualpipe.stages", "dualpipe.checkpoint",
                 "dualpipe.clip", "dualpipe.data_parallel", "dualpipe.metrics",
                 "dualpipe.testing", "dualpipe.models")),
    ("apps", ("dualpipe.demo", "dualpipe.cli", "dualpipe.__main__", "dualpipe")),
]
"""Bottom up. A module may import its own layer and the layers below, except that the
two leaves above the analysis layer, ``autograd`` and ``transport``, know nothing of
each other."""

RANK = {"errors": 0, "schedules": 1, "analysis": 2, "autograd": 3, "transport": 3,
        "runtime": 4, "plug-ins": 5, "helpers": 6, "apps": 7}

TORCH_FREE = ("errors", "schedules", "analysis")
"""Layers that import neither torch nor anything that needs it."""


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(the package's modules ``name`` imports, the top-level names of others)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import module`` depends on that module; any other name, on pkg
            subs = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [origin, *subs]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "dualpipe":
                while target not in MODULES and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    ours.add(target)
            else:
                others.add(target.split(".")[0])
    return ours, others


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> str:
    best, length = "", -1
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > length:
                best, length = layer, len(prefix)
    assert best, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer_of(name)


def test_no_import_circles() -> None:
    assert _cycles({name: ours for name, (ours, _) in GRAPH.items()}) == []


def test_the_checker_sees_a_circle() -> None:
    # control: the same check on a graph with a circle, and on one through a package
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == [["p", "p.x"]]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name: str) -> None:
    layer = layer_of(name)
    for target in GRAPH[name][0]:
        other = layer_of(target)
        allowed = other == layer or RANK[other] < RANK[layer]
        assert allowed, f"{name} ({layer}) imports {target} ({other})"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n) in TORCH_FREE))
def test_schedules_and_analysis_need_no_torch(name: str) -> None:
    assert "torch" not in GRAPH[name][1], f"{name} imports torch"


def test_the_runtime_imports_no_plug_in_demo_or_cli() -> None:
    for name, (ours, _) in GRAPH.items():
        if layer_of(name) == "runtime":
            bad = {t for t in ours if layer_of(t) in ("plug-ins", "helpers", "apps")}
            assert not bad, f"{name} imports {sorted(bad)}"


def test_a_layer_violation_is_seen() -> None:
    # control: the schedules may not import the runtime
    assert RANK[layer_of("dualpipe.runtime.pipeline")] > RANK[layer_of("dualpipe.schedules.io")]
    ours, _ = _imports("dualpipe.runtime.executor", MODULES["dualpipe.runtime.executor"])
    assert "dualpipe.runtime.kernels" in ours and "dualpipe.transport.base" in ours
