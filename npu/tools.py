"""Foundation subcommands of ``npu``: info, isa, asm, disasm, and a temporary demo.

Registered by :mod:`npu.cli` through :func:`add_parser`. The ``demo`` here assembles, checks and
summarises ``examples/hello.s``; it is only registered while no ``npu.models.cli`` module exists
(that module provides the full compile + run + profile demo).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from npu import isa
from npu.asm import assemble, assemble_file, disassemble
from npu.cli import CLIError
from npu.program import Program, load

__all__ = ["add_parser", "package_versions", "presets_table", "EXAMPLES_DIR"]

#: Distributions whose versions ``npu info`` reports.
_PACKAGES = ("npu", "numpy", "numba", "onnx", "onnxruntime", "amaranth")
#: The repository's examples folder (present in a source checkout / editable install).
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _write(path: Path, data: bytes | str) -> None:
    try:
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
    except OSError as exc:
        raise CLIError(f"cannot write {str(path)!r}: {exc.strerror}") from None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------
# npu info
# --------------------------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    """Installed version of each package the stack uses (None if not installed)."""
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _kib(n: int) -> str:
    return f"{n // 1024} KiB" if n < 1 << 20 else f"{n / (1 << 20):g} MiB"


def presets_table() -> str:
    """The config presets as a text table."""
    rows = [[c.name, f"{c.rows}x{c.cols}", f"{c.spad_rows} x {c.spad_row_bytes} B",
             _kib(c.spad_bytes), f"{c.acc_rows} x {c.cols} int32", _kib(c.acc_bytes),
             str(c.dram_latency), str(c.dram_beat_bytes), str(c.queue_depth)]
            for c in isa.PRESETS.values()]
    return _table(rows, ["preset", "array", "SPAD rows", "SPAD", "ACC rows", "ACC",
                         "DRAM latency", "beat B", "queue"])


def _cmd_info(args: argparse.Namespace) -> int:
    if args.config is not None:
        cfg = isa.get_config(args.config)
        if args.json:
            print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        else:
            print(_table([[k, str(v)] for k, v in cfg.to_dict().items()], ["field", "value"]))
        return 0
    versions = package_versions()
    if args.json:
        print(json.dumps({"versions": versions,
                          "presets": {k: c.to_dict() for k, c in isa.PRESETS.items()}},
                         indent=2))
        return 0
    print(f"npu {versions['npu'] or '(not installed)'}  (Python {sys.version.split()[0]})")
    print(_table([[k, v or "not installed"] for k, v in versions.items()],
                 ["package", "version"]))
    print()
    print("Config presets (default npu16; `npu info --config NAME` for all fields):")
    print(presets_table())
    return 0


# --------------------------------------------------------------------------------------------
# npu isa
# --------------------------------------------------------------------------------------------

def _fault_markdown() -> str:
    lines = ["| code | name |", "|---|---|"]
    lines += [f"| {int(f)} | {f.name} |" for f in isa.Fault]
    return "\n".join(lines)


def _cmd_isa(args: argparse.Namespace) -> int:
    if args.markdown:
        print(isa.instruction_table_markdown())
        print()
        print("Fault codes:")
        print()
        print(_fault_markdown())
        return 0
    rows = []
    for op in isa.Opcode:
        eng = isa.OPCODE_ENGINE[op]
        busy, lat = isa.TIMING[op]
        rows.append([str(int(op)), op.name, eng.name if eng is not None else
                     ("field" if op == isa.Opcode.SYNC else "-"), isa.OPCODE_UNIT[op].name,
                     busy, lat])
    print(f"Instructions ({isa.INSTR_BITS}-bit; header: opcode[3:0] wait[7:4] signal[11:8]):")
    print(_table(rows, ["op", "name", "engine", "unit", "busy cycles", "latency"]))
    print()
    print("Fields (name:bits, s = signed):")
    for op in isa.Opcode:
        fields = [f"{k}:{f.width}{'s' if f.signed else ''}"
                  for k, f in isa.LAYOUTS[op].items() if k not in ("opcode", "wait", "signal")]
        print(f"  {op.name:<8} {' '.join(fields) or '-'}")
    print()
    print("Fault codes: " + ", ".join(f"{int(f)} {f.name}" for f in isa.Fault))
    return 0


# --------------------------------------------------------------------------------------------
# npu asm / disasm
# --------------------------------------------------------------------------------------------

def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _summary(program: Program) -> str:
    return (f"{_count(program.n_instructions, 'instruction')}, "
            f"{_count(len(program.segments), 'segment')}, {_count(len(program.inputs), 'input')}, "
            f"{_count(len(program.outputs), 'output')}, config {program.config.name}, "
            f"DRAM {program.dram_bytes} bytes")


def _cmd_asm(args: argparse.Namespace) -> int:
    src = Path(args.source)
    out = Path(args.output) if args.output else src.with_suffix(".npub")
    if out.resolve() == src.resolve():
        raise CLIError(f"output {str(out)!r} would overwrite the source; pass -o")
    program = assemble_file(src, config=args.config)
    data = program.to_bytes()
    _write(out, data)
    print(f"{src} -> {out}: {_summary(program)}, {len(data)} bytes")
    return 0


def _cmd_disasm(args: argparse.Namespace) -> int:
    config = isa.get_config(args.config) if args.config else None
    program = load(args.program, config)
    files: dict[int, str] = {}
    if args.segment_files:
        if not args.output:
            raise CLIError("--segment-files needs -o (the files go next to the .s file)")
        out = Path(args.output)
        for idx, seg in enumerate(program.segments):
            name = f"{out.stem}.seg{idx}.bin"
            _write(out.parent / name, bytes(seg.data))
            files[idx] = name
    text = disassemble(program, segment_files=files)
    if args.output:
        _write(Path(args.output), text)
        print(f"{args.program} -> {args.output}: {_summary(program)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------------------------
# npu demo (temporary: replaced by npu.models.cli)
# --------------------------------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    src = Path(args.source) if args.source else EXAMPLES_DIR / "hello.s"
    if not src.is_file():
        raise CLIError(f"example program {str(src)!r} not found (run from a source checkout "
                       f"or pass a .s file)")
    program = assemble_file(src)
    data = program.to_bytes()
    loaded = Program.from_bytes(data, program.config)          # validate as a file
    text = disassemble(loaded)
    again = assemble(text, base_dir=src.parent).to_bytes()
    if again != data:
        raise CLIError("disassemble -> assemble did not reproduce the program (a bug)")
    print(f"Assembled {src}: {_summary(program)}; {len(data)}-byte .npub, validated, "
          f"disassembled and reassembled to identical bytes.")
    instrs = loaded.decoded()
    per_engine = Counter(i.engine.name if i.engine is not None else "dispatcher" for i in instrs)
    print("Instructions per engine: " + ", ".join(f"{k} {v}" for k, v in per_engine.items()))
    print()
    print(f"Timing contract on {program.config.name} (npu.isa.timing; the runtime adds the "
          f"waits):")
    rows = []
    for idx, ins in enumerate(instrs):
        t = isa.timing(ins, program.config)
        eng = ins.engine.name if ins.engine is not None else "-"
        rows.append([str(idx), loaded.region_of(idx), ins.opcode.name, eng, t.unit.name,
                     str(t.busy), str(t.latency)])
    print(_table(rows, ["#", "region", "instruction", "engine", "unit", "busy", "latency"]))
    busy = Counter()
    for ins in instrs:
        t = isa.timing(ins, program.config)
        if t.unit != isa.Unit.NONE:
            busy[t.unit.name] += t.busy
    print()
    print("Busy cycles per unit: " + ", ".join(f"{k} {v}" for k, v in busy.items()))
    return 0


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> None:
    """Register info, isa, asm, disasm (and demo unless npu.models.cli provides it)."""
    p = subparsers.add_parser(
        "info", help="package versions and config presets",
        description="Print the versions of npu and its dependencies and the NPU config presets. "
                    "With --config, print one config (a preset name or a .json file).")
    p.add_argument("--config", metavar="NAME|FILE.json",
                   help="print this config's fields instead of the overview")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=_cmd_info)

    p = subparsers.add_parser(
        "isa", help="the instruction set: opcodes, fields, timing, fault codes",
        description="Print the instruction table (engine, unit, busy and latency formulas), "
                    "each opcode's fields and the fault codes, all from npu.isa.")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown tables used in docs/architecture.md")
    p.set_defaults(func=_cmd_isa)

    p = subparsers.add_parser(
        "asm", help="assemble a .s text program into a .npub file",
        description="Assemble NPU assembly text (syntax: docs/asm.md) into a validated .npub "
                    "program file.",
        epilog="example: npu asm examples/hello.s -o out/hello.npub")
    p.add_argument("source", help="assembly file (.s)")
    p.add_argument("-o", "--output", metavar="PROG.npub",
                   help="output file (default: the source with suffix .npub)")
    p.add_argument("--config", metavar="NAME|FILE.json",
                   help="config to assemble for when the source has no .config line (default "
                        "npu16); must match it otherwise")
    p.set_defaults(func=_cmd_asm)

    p = subparsers.add_parser(
        "disasm", help="disassemble a .npub file into assembly text",
        description="Load and validate a .npub program and print it as assembly text; "
                    "`npu asm` of that text gives the identical file.",
        epilog="example: npu disasm out/hello.npub -o out/hello.s")
    p.add_argument("program", help="program file (.npub)")
    p.add_argument("-o", "--output", metavar="PROG.s", help="write here instead of stdout")
    p.add_argument("--config", metavar="NAME|FILE.json",
                   help="require that the program was built for this config")
    p.add_argument("--segment-files", action="store_true",
                   help="write each DRAM segment to a .bin file next to the output and refer to "
                        "it with file= (instead of hex lines)")
    p.set_defaults(func=_cmd_disasm)

    if importlib.util.find_spec("npu.models.cli") is None:
        p = subparsers.add_parser(
            "demo", help="assemble, validate and summarise the example program",
            description="Assemble examples/hello.s, validate it as a program file, check that "
                        "disassembly reassembles to identical bytes, and print each "
                        "instruction's timing from the timing contract.")
        p.add_argument("source", nargs="?", help="assembly file (default examples/hello.s)")
        p.set_defaults(func=_cmd_demo)
