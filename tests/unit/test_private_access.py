"""Private pieces of Synapse, aiocoap, asyncio and noiseprotocol are reached only in their
compat modules.

A grep over the package's syntax trees (every module except the compat
modules themselves) for:

* an attribute, method or string naming one of the private pieces the compat
  modules declare (``PRIVATE_NAMES``);
* any other ``x._name`` whose name the package does not define itself (a new
  private access to some library, not declared in a compat module);
* an import from a private module (``synapse.app._base``) or of a private
  name of another package;
* noiseprotocol at all (the handshake no longer uses it).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from synapse_coap.synapse import asyncio_compat
from synapse_coap.synapse import compat as synapse_compat
from synapse_coap.transport import aiocoap_compat

PACKAGE = Path(synapse_compat.__file__).resolve().parents[1]
COMPAT_MODULES = {
    PACKAGE / "synapse" / "compat.py",
    PACKAGE / "transport" / "aiocoap_compat.py",
    PACKAGE / "synapse" / "asyncio_compat.py",
}
DECLARED = (
    synapse_compat.PRIVATE_NAMES | aiocoap_compat.PRIVATE_NAMES | asyncio_compat.PRIVATE_NAMES
)


def _modules() -> list[tuple[Path, ast.Module]]:
    return [
        (path, ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in COMPAT_MODULES
    ]


def _own_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Every name the package itself defines (attributes it sets, functions, classes, arguments)."""
    own: set[str] = set()
    for _path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
    return own - DECLARED


def _findings() -> list[str]:
    trees = _modules()
    own = _own_names(trees)
    found = []
    for path, tree in trees:
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                if node.attr in DECLARED or (
                    not node.attr.startswith("__") and node.attr not in own
                ):
                    found.append(f"{where}:{line}: .{node.attr}")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name in DECLARED:
                    found.append(f"{where}:{line}: def {node.name} (overrides a private piece)")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in DECLARED:
                    found.append(f"{where}:{line}: {node.value!r}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] in ("noise",):
                    found.append(f"{where}:{line}: imports noiseprotocol ({node.module})")
                elif parts[0] not in ("synapse_coap", "__future__"):
                    if any(p.startswith("_") for p in parts):
                        found.append(f"{where}:{line}: from {node.module} import ...")
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            found.append(f"{where}:{line}: from {node.module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == "noise":
                        found.append(f"{where}:{line}: imports noiseprotocol ({alias.name})")
                    elif any(p.startswith("_") for p in parts[1:]):
                        found.append(f"{where}:{line}: import {alias.name}")
    return found


def test_no_private_library_access_outside_the_compat_modules() -> None:
    assert _findings() == []


def test_the_grep_finds_a_private_access(monkeypatch: pytest.MonkeyPatch) -> None:
    # the same scan, with one private access put back into one module
    module = PACKAGE / "synapse" / "module.py"
    source = module.read_text()
    broken = source.replace("hs = compat.homeserver(api)", "hs = api._hs")
    assert broken != source
    real_read_text = Path.read_text

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        return broken if self == module else real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert [f for f in _findings() if "module.py" in f] == [
        f"synapse_coap/synapse/module.py:{_line_of(broken, 'api._hs')}: ._hs"
    ]


def _line_of(source: str, text: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if text in line)


def _is_class_name(node: ast.AST) -> bool:
    # type(x).__name__ or x.__class__.__name__
    if not (isinstance(node, ast.Attribute) and node.attr == "__name__"):
        return False
    inner = node.value
    if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name):
        return inner.func.id == "type"
    return isinstance(inner, ast.Attribute) and inner.attr == "__class__"


def test_exceptions_are_matched_by_class_not_by_name() -> None:
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                _is_class_name(x) for x in (node.left, *node.comparators)
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []
