"""docs/architecture.md is the module map and the import rule; this test holds the code to it.

Every module of the package has a row (a new module without one fails here, so the map cannot go
stale), and no module imports from a layer above its own. Modules the map marks "sans-I/O"
import no I/O library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qmpagent"
MAP = ROOT / "docs" / "architecture.md"
ROW = re.compile(r"^\| `(?P<module>[\w.]+)` \| (?P<layer>\d) \| (?P<owns>.*) \|$")
IO_MODULES = {"asyncio", "anyio", "socket", "subprocess", "selectors", "qemu"}
LIBRARY_TOP = 3  # layers 0-3 are the library; 4 are the surfaces (root, CLI, testing)


def _rows() -> dict[str, tuple[int, str]]:
    rows = {}
    for line in MAP.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[m["module"]] = (int(m["layer"]), m["owns"])
    return rows


def _unit(path: Path) -> str:
    """The map's name for a source file: a top-level module, or its subpackage (cli, testing)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


def _imports(path: Path) -> list[tuple[str, int]]:
    """(what is imported, line) for every import: package units by their map name, others by
    their top-level name prefixed with '!'."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(PACKAGE)
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "qmpagent":
                    found.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
                else:
                    found.append(("!" + parts[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "qmpagent":
                    found.append((parts[1] if len(parts) > 1 else "__init__", node.lineno))
                else:
                    found.append(("!" + parts[0], node.lineno))
                continue
            # Relative: resolve against the file's package, then name the unit it lands in.
            base = list(rel.parts[:-1])
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = base + (node.module.split(".") if node.module else [])
            if not target:  # `from . import x` at the top: x is a module, or a name of the root
                found.extend(
                    (alias.name if _is_module(alias.name) else "__init__", node.lineno)
                    for alias in node.names
                )
            else:
                found.append((target[0], node.lineno))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_on_the_map() -> None:
    rows = _rows()
    units = {_unit(p) for p in SOURCES}
    assert not units - rows.keys(), f"modules missing from {MAP.name}: {sorted(units - rows.keys())}"
    assert not rows.keys() - units, f"rows for modules that do not exist: {sorted(rows.keys() - units)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path: Path) -> None:
    rows = _rows()
    unit = _unit(path)
    layer, owns = rows[unit]
    for name, line in _imports(path):
        if name.startswith("!"):
            if owns.startswith("sans-I/O."):
                assert name[1:] not in IO_MODULES, f"{path.name}:{line} is sans-I/O but imports {name[1:]}"
            continue
        if name == unit:
            continue
        assert name in rows, f"{path.name}:{line} imports {name}, which is not on the map"
        if layer <= LIBRARY_TOP:
            assert name not in ("cli", "testing"), f"{path.name}:{line}: the library imports {name}"
        assert rows[name][0] <= layer, (
            f"{path.name}:{line}: {unit} (layer {layer}) imports {name} (layer {rows[name][0]})"
        )


def test_monitor_helpers_use_the_protocol_not_the_monitor() -> None:
    for helper in ("block", "jobs", "ports"):
        names = {name for name, _ in _imports(PACKAGE / f"{helper}.py")}
        assert "monitor" not in names, f"{helper}.py imports qmpagent.monitor; use _monitor_api"


def _private_names_imported(path: Path, source: str | None = None) -> list[tuple[str, str, int]]:
    """(module, name, line) for every underscore-prefixed name ``path`` imports from a module of
    the package (``from .x import _y``, ``from qmpagent.x import _y``). Importing a private
    *module* (``from . import _addresses``) or public names from one (``from ._shield import
    run_to_completion``) is not reaching into private state. ``source``: the file's text (default:
    read from ``path``)."""
    tree = ast.parse(path.read_text() if source is None else source)
    rel = path.relative_to(PACKAGE)
    found: list[tuple[str, str, int]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if (node.module or "").split(".")[0] != "qmpagent":
                continue
            parts = (node.module or "").split(".")[1:]
        else:
            base = list(rel.parts[:-1])
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            parts = base + (node.module.split(".") if node.module else [])
        directory = PACKAGE.joinpath(*parts)
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__"):
                continue
            if (directory / f"{name}.py").exists() or (directory / name / "__init__.py").exists():
                continue  # a module of the package, imported as a module
            found.append((".".join(["qmpagent", *parts]), name, node.lineno))
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    bad = [f"{path.name}:{line}: from {module} import {name}"
           for module, name, line in _private_names_imported(path)]
    assert not bad, f"private names of another module imported: {bad}"


def test_the_private_import_check_sees_violations() -> None:
    # The check itself: a private name is caught in both spellings, a private module is not.
    source = (
        "from ..snapshot import SnapshotOrchestrator as _Orch\n"
        "from ..operation import _keeping_thaw_error\n"
        "from qmpagent.backup import _fsync_all\n"
        "from .. import _shield\n"
        "from .._shield import run_to_completion\n"
    )
    found = {(m, n) for m, n, _ in _private_names_imported(PACKAGE / "cli" / "probe.py", source)}
    assert found == {("qmpagent.operation", "_keeping_thaw_error"), ("qmpagent.backup", "_fsync_all")}
