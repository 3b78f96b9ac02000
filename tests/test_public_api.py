"""The public surface: exports, docstrings, the error tree, layering."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import qmpagent
import qmpagent.testing

PACKAGE = Path(qmpagent.__file__).parent


@pytest.mark.parametrize("module", [qmpagent, qmpagent.testing], ids=lambda m: m.__name__)
def test_all_is_exact_and_documented(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(set(names), key=names.index), "duplicates in __all__"
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"
    # Every public class or function defined in the package and imported here is listed.
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and getattr(v, "__module__", "").startswith("qmpagent")
    }
    assert public <= set(names), f"not in __all__: {sorted(public - set(names))}"


def test_public_methods_have_docstrings() -> None:
    missing = []
    for name in qmpagent.__all__:
        obj = getattr(qmpagent, name)
        if not inspect.isclass(obj) or not obj.__module__.startswith("qmpagent"):
            continue
        for attr, value in vars(obj).items():
            if attr.startswith("_") or not (
                inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
            ):
                continue
            if not inspect.getdoc(getattr(obj, attr)):
                missing.append(f"{name}.{attr}")
    assert not missing, missing


def test_error_tree() -> None:
    errors = [getattr(qmpagent, n) for n in qmpagent.__all__ if n.endswith(("Error", "Unavailable",
                                                                            "Timeout", "Overflow"))]
    errors = [e for e in errors if inspect.isclass(e) and issubclass(e, BaseException)]
    assert len(errors) >= 15
    for err in errors:
        assert issubclass(err, qmpagent.QMPAgentError), err
    assert issubclass(qmpagent.AgentTimeout, TimeoutError)
    assert issubclass(qmpagent.MonitorTimeout, TimeoutError)
    assert issubclass(qmpagent.ThawError, qmpagent.SnapshotError)
    e = qmpagent.AgentCommandError("guest-x", "CommandNotFound", "nope")
    assert (e.error_class, e.desc, e.command) == ("CommandNotFound", "nope", "guest-x")
    # The tree drawn in the docstring names every error class.
    doc = inspect.getdoc(qmpagent.errors) or ""
    for err in errors:
        assert err.__name__ in doc, err


def test_py_typed_is_shipped() -> None:
    assert (PACKAGE / "py.typed").exists()


def test_library_does_not_import_testing_and_only_cli_prints() -> None:
    code = "import sys, qmpagent; print(sorted(m for m in sys.modules if m.startswith('qmpagent')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "qmpagent.testing" not in out.stdout
    assert "qmpagent.cli" not in out.stdout
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ("cli.py", "__main__.py") or rel.startswith("cli/"):  # the CLI (a package now)
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{rel}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("basicConfig", "run")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("logging", "asyncio")
            ):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_sans_io_core_imports_no_io() -> None:
    tree = ast.parse((PACKAGE / "agent_protocol.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "anyio", "selectors", "qemu"}, imported
