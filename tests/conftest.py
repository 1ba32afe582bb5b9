"""Shared fixtures: the repository root and the example program."""

from __future__ import annotations

from pathlib import Path

import pytest

from npu.asm import assemble_file
from npu.program import Program

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (docs/, examples/, npu/, ...)."""
    return REPO


@pytest.fixture
def hello_program() -> Program:
    """examples/hello.s, assembled (a fresh object per test)."""
    return assemble_file(REPO / "examples" / "hello.s")
