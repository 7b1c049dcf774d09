"""The package's layout as a rule: what may import what (docs: README, Layout).

- formats/ is pure: it imports nothing of pystate but ``errors`` and its siblings, and no
  module that does I/O or runs processes;
- system/ wraps the kernel and tools: it knows no pipeline (volume/, initrd/, booted/,
  config, the CLI);
- volume/ is what both sides share: never initrd/ or booted/;
- initrd/ and booted/ never import each other;
- the shared top-level modules (config, errors, log, report, secret) import only formats/
  and each other; only cli and __main__ may import everything;
- testhooks/ (the test build's power cuts and PCR extends, left out of the shipped program)
  is imported by one module only, the seam volume/hooks.py, and itself knows no pipeline.

Imports are read with ast, function-local and TYPE_CHECKING ones included: a dependency
for types is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pystate_initrd"
NAME = "pystate_initrd"
SHARED = {"config", "errors", "log", "report", "secret", "__init__"}
# Who may import whom, by layer (a top-level shared module is its own layer, "shared").
ALLOWED = {
    "formats": {"formats", "errors"},
    "shared": {"formats", "shared"},
    "system": {"system", "formats", "shared"},
    "volume": {"volume", "system", "formats", "shared"},
    "initrd": {"initrd", "volume", "system", "formats", "shared"},
    "booted": {"booted", "volume", "system", "formats", "shared"},
    "entry": {"entry", "initrd", "booted", "volume", "system", "formats", "shared"},
    "testhooks": {"testhooks", "system", "formats", "shared"},
}
# The only module that may import testhooks/ (which a production build does not hold).
SEAM = "pystate_initrd.volume.hooks"
# Standard modules that mean I/O or processes: never in formats/.
IO_MODULES = {
    "subprocess", "fcntl", "shutil", "tempfile", "selectors", "socket", "ctypes", "cffi",
    "_cffi_backend", "mmap", "pathlib", "os", "io", "glob",
}  # fmt: skip


def layer(module: str) -> str:
    """The layer of a dotted module name inside the package (errors is its own)."""
    parts = module.split(".")[1:]
    if not parts:
        return "shared"  # the package itself: __version__
    if parts[0] in ALLOWED:
        return parts[0]
    if parts[0] == "errors":
        return "errors"
    if parts[0] in SHARED:
        return "shared"
    if parts[0] in ("cli", "__main__"):
        return "entry"
    raise AssertionError(f"{module}: not in any layer; add its folder to tests/test_layout.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts)


def type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines of the imports under ``if TYPE_CHECKING:`` (for annotations only)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = (
        module_name(path).rpartition(".")[0]
        if path.name != "__init__.py"
        else module_name(path).removesuffix(".__init__")
    )
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # "from pystate_initrd.formats import gpt" imports the submodule gpt
            found += [
                (node.lineno, f"{module}.{a.name}") for a in node.names if module.startswith(NAME)
            ]
    return found


def sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_linux_ffi.py")


def is_module(dotted: str) -> bool:
    relative = dotted.split(".")[1:]
    target = PACKAGE.joinpath(*relative)
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    mine = layer(module_name(path))
    allowed = ALLOWED.get(mine, {"errors"} if mine == "errors" else set())
    wrong = []
    annotations_only = type_checking_lines(ast.parse(path.read_text(), str(path)))
    for line, module in imports(path):
        if not module.startswith(NAME + ".") and module != NAME:
            io = module.split(".")[0] in IO_MODULES and line not in annotations_only
            if mine == "formats" and io:
                wrong.append(f"line {line}: {module} (formats/ does no I/O)")
            continue
        if not is_module(module) and module != NAME:
            continue  # a name imported from a module, already checked as that module
        theirs = layer(module)
        if theirs == "testhooks" and mine != "testhooks":
            if module_name(path) != SEAM:
                wrong.append(f"line {line}: {module} (only {SEAM} reaches the test hooks)")
            continue
        if theirs != mine and theirs not in allowed and theirs != "errors":
            wrong.append(f"line {line}: {module} ({mine} may not import {theirs})")
    assert wrong == [], f"{path.relative_to(PACKAGE.parent)}:\n" + "\n".join(wrong)


def test_every_module_has_a_layer() -> None:
    # A new top-level module or folder must be placed in a layer on purpose.
    for path in sources():
        layer(module_name(path))


def test_the_layers_are_the_folders() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {"formats", "system", "volume", "initrd", "booted", "testhooks"}
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= SHARED | {"cli", "__main__"}, top - SHARED
