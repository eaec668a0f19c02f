"""Imports run down the layers of docs/architecture.md, never back up, and no module name is used twice."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "checkpointer"

# Lower layers know nothing of higher ones. archive/, adapters/ and metrics are one layer: the bytes
# of an archive and the I/O at the edges (the store streams through the S3 client, podman's export is
# read as chunks, the spool's usage is a metric).
LAYERS = [
    {
        "checkpointer",
        "models",
        "reasons",
        "errors",
        "conditions",
        "durations",
        "ttl",
        "flags",
        "settings",
        "logs",
        "layout",
        "memory",
    },
    {"archive", "adapters", "metrics"},
    {"status"},
    {"services"},
    {"controller", "agent", "cli"},
    {"__main__"},
]


def layer_of(module: str) -> int:
    """The layer of `checkpointer.x.y` from its first part below the package."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "checkpointer"
    for number, members in enumerate(LAYERS):
        if head in members:
            return number
    raise AssertionError(f"{module} is in no layer of this test: add it to LAYERS and docs/architecture.md")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join(parts)


def is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("checkpointer"):
            if node.module == "checkpointer":
                # `from checkpointer import layout`: a module; `from checkpointer import GROUP`: the package.
                found |= {f"checkpointer.{a.name}" if is_module(a.name) else "checkpointer" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("checkpointer")}
    return found


def test_imports_run_down_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in imports(path):
            if layer_of(target) > layer_of(source):
                upward.append(f"{source} imports {target}")
    assert upward == []


def test_no_module_name_is_used_twice() -> None:
    names = Counter(p.stem for p in PACKAGE.rglob("*.py") if p.stem != "__init__")
    assert [name for name, count in names.items() if count > 1] == []


def test_no_module_imports_a_private_name_of_another() -> None:
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("checkpointer"):
                private += [
                    f"{module_name(path)}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert private == []


def test_no_test_file_name_is_used_twice() -> None:
    # pytest imports test modules by their basename (no __init__.py): two files of one name stop its collection.
    names = Counter(p.name for p in (PACKAGE.parents[1] / "tests").rglob("test_*.py"))
    assert [name for name, count in names.items() if count > 1] == []
