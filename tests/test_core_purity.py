"""The core must stay pure: nothing in it may reach a clock, a socket, a bus or a disk."""

import ast
from pathlib import Path

import firmware_py.core

FORBIDDEN = {"time", "asyncio", "socket", "threading", "can", "cantools", "pymodbus", "serial",
             "sqlite3", "openleadr", "os", "subprocess", "random", "datetime", "logging", "pathlib",
             "selectors", "signal", "multiprocessing", "sunspec2", "rich", "io"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_nothing_of_io():
    files = sorted(Path(firmware_py.core.__file__).parent.glob("*.py"))
    assert len(files) >= 6
    offenders = {f.name: sorted(imported_roots(f) & FORBIDDEN) for f in files}
    assert {name: bad for name, bad in offenders.items() if bad} == {}


def test_core_imports_only_itself_from_the_project():
    for f in Path(firmware_py.core.__file__).parent.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("firmware_py"):
                assert node.module.startswith("firmware_py.core"), f"{f.name} imports {node.module}"
