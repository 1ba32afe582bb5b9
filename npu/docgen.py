"""Regenerate the instruction table of docs/architecture.md from :mod:`npu.isa`.

``python -m npu.docgen`` rewrites the block between the BEGIN/END markers in place;
``python -m npu.docgen --check`` exits 1 (and changes nothing) when the document is stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from npu.isa import instruction_table_markdown

__all__ = ["BEGIN", "END", "DOC", "render", "main"]

BEGIN = "<!-- BEGIN GENERATED INSTRUCTION TABLE -->"
END = "<!-- END GENERATED INSTRUCTION TABLE -->"
#: The document in a source checkout.
DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


class DocgenError(Exception):
    """The document lacks the markers (or has them out of order)."""


def render(text: str, table: str | None = None) -> str:
    """``text`` with the generated block replaced by ``table`` (default: the ISA's table)."""
    table = instruction_table_markdown() if table is None else table
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < 0 or end < begin or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise DocgenError(f"the document needs exactly one {BEGIN!r} followed by one {END!r}")
    return text[:begin + len(BEGIN)] + "\n" + table.rstrip("\n") + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npu.docgen", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the document is stale instead of rewriting it")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"document (default {DOC})")
    args = parser.parse_args(argv)
    try:
        text = args.doc.read_text(encoding="utf-8")
        new = render(text)
    except (OSError, DocgenError) as exc:
        print(f"docgen: error: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{args.doc}: instruction table is up to date")
        return 0
    if args.check:
        print(f"{args.doc}: instruction table is stale; run `python -m npu.docgen`",
              file=sys.stderr)
        return 1
    args.doc.write_text(new, encoding="utf-8")
    print(f"{args.doc}: instruction table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
