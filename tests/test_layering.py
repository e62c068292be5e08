"""The core's layering holds: what imports what, and where proton's C binding is used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tunnel"
#: The engine facade: the only modules that may touch proton's C binding.
FACADE = {PACKAGE / "amqp" / "engine.py", PACKAGE / "amqp" / "handles.py"}
#: The sans-IO core: no asyncio, no clock, no untyped values.
CORE = [
    "tunnel.connection",
    "tunnel.dialects.link_route",
    "tunnel.dialects.tcp_adaptor",
    "tunnel.http2_stream",
    "tunnel.http2_message",
]


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_engine_facade_touches_the_c_binding() -> None:
    offenders = []
    for path in _sources():
        if path in FACADE:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [alias.name for alias in node.names]
                if any(name == "cproton" or name.startswith("cproton.") for name in names):
                    offenders.append(f"{path.name}:{node.lineno} imports cproton")
            elif isinstance(node, ast.Name | ast.Attribute):
                name = node.id if isinstance(node, ast.Name) else node.attr
                if name.startswith("pn_") or name in ("raw_lib", "raw_ffi"):
                    offenders.append(f"{path.name}:{node.lineno} uses {name}")
    assert offenders == []


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_asyncio(module: str) -> None:
    """Imported alone, in a fresh interpreter: nothing it needs pulls asyncio in."""
    probe = f"import sys, {module}; print('asyncio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("module", CORE)
def test_the_core_reads_no_clock_and_holds_no_any(module: str) -> None:
    path = PACKAGE / (module.removeprefix("tunnel.").replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "Any":
            found.append(f"Any at line {node.lineno}")
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names]
            found += [f"imports {n}, line {node.lineno}" for n in names if n in ("time", "asyncio")]
    assert found == []
