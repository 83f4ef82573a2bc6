"""The architecture's rules, checked on the source tree (so that it stays as the README draws it).

- the core (src/tuneval) never imports prefect, and only tuneval.tracking imports mlflow;
- no import cycle between the core's modules (lazy imports inside functions included);
- no module uses another module's ``_private`` name;
- modules stay small (300 lines);
- only tuneval.accel's own modules import its levers (the one seam);
- pyproject's package list names every package of the tree (flows/ and tasks/ as tuneval.*).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "src" / "tuneval"
LAYERS = {"tuneval.flows": ROOT / "flows", "tuneval.tasks": ROOT / "tasks"}
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for base, folder in [("tuneval", CORE), *LAYERS.items()]:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([base, *parts])] = path
    return out


MODULES = _modules()


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, lazy ones too."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import mod` imports the module pkg.mod
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(s, [], node.lineno) for s in subs]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
    return out


def _core_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        if not path.is_relative_to(CORE):
            continue
        deps = set()
        for target, _, _ in _imports(path, mod):
            if target in MODULES and target != mod and MODULES[target].is_relative_to(CORE):
                deps.add(target)
        graph[mod] = deps
    return graph


def test_core_never_imports_the_orchestrator_and_only_tracking_imports_mlflow() -> None:
    bad = []
    for mod, path in MODULES.items():
        if not path.is_relative_to(CORE):
            continue
        for target, _, line in _imports(path, mod):
            top = target.split(".")[0]
            if top == "prefect" or target.startswith(("tuneval.flows", "tuneval.tasks")):
                if mod != "tuneval.cli" and not mod.startswith("tuneval.cli."):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
            if top == "mlflow" and not mod.startswith("tuneval.tracking."):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_in_the_core() -> None:
    graph = _core_graph()
    assert len(graph) > 40  # the walk found the tree
    # Modules importing their own package's __init__ (e.g. tuneval.accel.bert_cls -> tuneval.accel)
    # is Python's normal package loading, not a cycle of ours: only edges into a sibling count.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if node.startswith(dep + "."):
                continue  # a submodule importing its parent package
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(cycles)


def test_no_private_name_used_from_another_module() -> None:
    bad = []
    for mod, path in MODULES.items():
        for target, names, line in _imports(path, mod):
            if target.startswith("tuneval"):
                bad += [
                    f"{path.relative_to(ROOT)}:{line}: {target}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    full = f"{node.module}.{a.name}" if isinstance(node, ast.ImportFrom) else a.name
                    aliases[a.asname or a.name.rpartition(".")[2]] = full
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and aliases.get(node.value.id, "").startswith("tuneval")
                and aliases[node.value.id] in MODULES
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines; split it by concept"


def test_speed_levers_are_reached_only_through_the_accel_seam() -> None:
    bad = []
    for mod, path in MODULES.items():
        if mod.startswith("tuneval.accel"):
            continue
        for target, _, line in _imports(path, mod):
            if target.startswith("tuneval.accel."):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, "\n".join(bad)


def test_every_package_is_installed_under_tuneval() -> None:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert set(config["packages"]) == packages
    assert config["package-dir"] == {"": "src", **{k: v.name for k, v in LAYERS.items()}}
    assert not any(p.split(".")[0] in ("flows", "tasks") for p in config["packages"])


def test_the_cli_lists_the_stages_in_pipeline_order() -> None:
    from tuneval.cli.main import STAGES
    from tuneval.pipeline.keys import ORDER

    assert STAGES == ORDER
