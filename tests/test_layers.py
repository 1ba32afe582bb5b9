"""The import rules of docs/architecture.md ("Layers"), checked on the source with ast.

Every .py file under npu/, hw/, compiler/, runtime/ and models/ is parsed, and every import
(also inside functions: a lazy import is still a dependency) is resolved to a module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Source folder -> package it installs as (pyproject.toml's package-dir).
FOLDERS = {"npu": "npu", "hw": "npu.hw", "compiler": "npu.compiler", "runtime": "npu.runtime",
           "models": "npu.models"}

# Layers, bottom up. A module may import the project packages its layer lists.
BASE = ("npu.isa", "npu.numerics")
PROGRAM = ("npu.program", "npu.builder", "npu.asm")
ALLOWED: dict[str, tuple[str, ...]] = {
    "base": (),
    "program": BASE + PROGRAM,
    "runtime": BASE + PROGRAM + ("npu.runtime",),
    "hw": BASE + PROGRAM + ("npu.hw",),
    "compiler": BASE + PROGRAM + ("npu.runtime", "npu.compiler"),
    "models": BASE + PROGRAM + ("npu.runtime", "npu.hw", "npu.compiler", "npu.models"),
}
#: Third-party packages only one layer may import.
EXCLUSIVE = {"amaranth": "hw", "numba": "runtime"}


def layer_of(module: str) -> str:
    """The layer of a project module; ``top`` (cli, tools, ...: may import anything) otherwise."""
    for name, layer in (("npu.hw", "hw"), ("npu.compiler", "compiler"),
                        ("npu.runtime", "runtime"), ("npu.models", "models")):
        if module == name or module.startswith(name + "."):
            return layer
    if module in BASE:
        return "base"
    if module in PROGRAM:
        return "program"
    return "top"


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in ``source``."""
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # `from npu import isa` imports the module npu.isa.
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names
                    if target in ("npu", "npu.hw", "npu.runtime", "npu.compiler", "npu.models")]
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Import-rule violations of one module's source."""
    layer = layer_of(module)
    bad = []
    for line, target in imports(source, module, is_package):
        top = target.split(".")[0]
        if top in EXCLUSIVE and EXCLUSIVE[top] != layer:
            bad.append(f"{module}:{line} imports {target} (only the {EXCLUSIVE[top]} layer may)")
        if top != "npu" or target == "npu" or layer == "top":
            continue
        allowed = ALLOWED[layer]
        if not any(target == a or target.startswith(a + ".") for a in allowed):
            # Importing the bare package `npu.runtime` etc. counts as that layer.
            bad.append(f"{module}:{line} ({layer} layer) imports {target}")
    return bad


def source_files() -> list[Path]:
    files = []
    for folder in FOLDERS:
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_every_source_file_follows_the_layer_rules() -> None:
    files = source_files()
    assert len(files) >= 8
    bad = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        bad += violations(source, module_name(path), path.name == "__init__.py")
    assert not bad, "import rules of docs/architecture.md broken:\n" + "\n".join(bad)


@pytest.mark.parametrize(("module", "source", "ok"), [
    ("npu.isa", "import numpy as np\nimport json", True),
    ("npu.isa", "from npu.program import Program", False),
    ("npu.numerics", "from npu import isa", False),
    ("npu.program", "from npu.isa import Instr\nfrom npu import numerics", True),
    ("npu.builder", "from npu.program import Program", True),
    ("npu.program", "import npu.runtime", False),
    ("npu.asm", "from npu.compiler import x", False),
    ("npu.runtime.engine", "import numba\nfrom npu.isa import timing\nfrom .result import R", True),
    ("npu.runtime.engine", "from npu.hw import npu", False),
    ("npu.runtime.engine", "from npu.compiler.x import y", False),
    ("npu.runtime.engine", "import amaranth", False),
    ("npu.hw.array", "from amaranth import Module\nfrom ..isa import LAYOUTS", True),
    ("npu.hw.array", "from ..runtime import engine", False),
    ("npu.hw.array", "from amaranth import Module\nfrom . import common", True),
    ("npu.hw.array", "def f():\n    from npu.runtime import engine", False),
    ("npu.hw.array", "import numba", False),
    ("npu.compiler.lower", "from npu.runtime import engine\nfrom npu.builder import B", True),
    ("npu.compiler.lower", "from npu.hw.npu import NPU", False),
    ("npu.compiler.lower", "from npu.models import cnn", False),
    ("npu.models.cnn", "from npu.compiler import compile\nfrom npu.hw import npu", True),
    ("npu.models.cnn", "from npu.tools import x", False),
    ("npu.models.cnn", "import numba", False),
    ("npu.tools", "from npu.models import cli\nfrom npu.runtime import engine", True),
])
def test_rule_checker(module: str, source: str, ok: bool) -> None:
    """The checker itself: it catches what it should and passes what it should."""
    assert (violations(source, module) == []) == ok, violations(source, module)


def test_relative_imports_resolve() -> None:
    assert imports("from .result import R", "npu.runtime.engine", False) == \
        [(1, "npu.runtime.result")]
    assert imports("from . import x", "npu.runtime", True) == [(1, "npu.runtime"),
                                                              (1, "npu.runtime.x")]
    assert imports("from .. import isa", "npu.hw.array", False) == [(1, "npu"), (1, "npu.isa")]
