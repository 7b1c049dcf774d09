"""Linters as tests: ruff on the tree, mypy strict on the package, shellcheck on scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _shell_scripts() -> list[Path]:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    scripts = []
    for name in tracked:
        path = REPO / name
        if not path.is_file():
            continue
        if path.suffix == ".sh":
            scripts.append(path)
            continue
        with path.open("rb") as f:
            first = f.readline()
        if first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith(b"/sh")):
            scripts.append(path)
    return scripts


def _check(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}"


def test_ruff_check() -> None:
    _check([str(BIN / "ruff"), "check", "."])


def test_ruff_format() -> None:
    _check([str(BIN / "ruff"), "format", "--check", "."])


def test_mypy_strict() -> None:
    _check([str(BIN / "mypy")])


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    _check(["shellcheck", "-x", str(script)])
