"""The documents agree with the code: the generated instruction table is current, and every
assembly example in docs/*.md and examples/*.s assembles and round-trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from npu import docgen
from npu.asm import assemble, assemble_file, disassemble
from npu.isa import instruction_table_markdown

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
ASM_BLOCK = re.compile(r"^```asm\n(.*?)^```", re.S | re.M)


def test_instruction_table_is_current() -> None:
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert instruction_table_markdown() in text
    assert docgen.render(text) == text, "docs/architecture.md is stale: run python -m npu.docgen"


def test_docgen_detects_and_fixes_staleness(tmp_path, capsys) -> None:
    doc = tmp_path / "a.md"
    doc.write_text(f"intro\n{docgen.BEGIN}\n| old | table |\n{docgen.END}\noutro\n")
    assert docgen.main(["--check", "--doc", str(doc)]) == 1
    assert "| old | table |" in doc.read_text()
    assert docgen.main(["--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{docgen.END}\noutro\n")
    assert instruction_table_markdown() in text and "| old |" not in text
    assert docgen.main(["--check", "--doc", str(doc)]) == 0
    doc.write_text("no markers here\n")
    assert docgen.main(["--check", "--doc", str(doc)]) == 2
    assert "needs exactly one" in capsys.readouterr().err


def asm_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for i, m in enumerate(ASM_BLOCK.finditer(doc.read_text(encoding="utf-8"))):
            blocks.append((f"{doc.name}#{i}", m.group(1)))
    return blocks


def test_docs_have_asm_examples() -> None:
    assert any(name.startswith("asm.md") for name, _ in asm_blocks())


@pytest.mark.parametrize(("name", "text"), asm_blocks())
def test_doc_asm_blocks_assemble_and_round_trip(name: str, text: str) -> None:
    program = assemble(text, filename=name, base_dir=REPO / "docs")
    data = program.to_bytes()
    assert assemble(disassemble(program)).to_bytes() == data


EXAMPLES = sorted((REPO / "examples").glob("*.s"))


def test_examples_exist() -> None:
    assert "hello.s" in [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_assemble_and_round_trip(path: Path) -> None:
    program = assemble_file(path)
    data = program.to_bytes()
    assert assemble(disassemble(program), base_dir=path.parent).to_bytes() == data
