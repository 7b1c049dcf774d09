"""Shared test fixtures and skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# pyproject's pythonpath puts REPO on sys.path (import pystate_initrd, pystate_build).
REPO = Path(__file__).resolve().parent.parent

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root for mounts and loop devices")
