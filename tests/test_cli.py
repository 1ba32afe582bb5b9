"""The foundation CLI commands through npu.cli.main: output, files, exit codes, no tracebacks."""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from npu import isa
from npu.asm import assemble_file
from npu.cli import main
from npu.program import Program


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys) -> None:
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert any(line.split() == ["numpy", metadata.version("numpy")] for line in out.splitlines())
    for name in ("npu", "numba", "onnx", "onnxruntime", "amaranth"):
        assert f"\n{name} " in out
    for name in isa.PRESETS:
        assert f"\n{name} " in out
    assert "256 KiB" in out and "64 KiB" in out and "16x16" in out


def test_info_json(capsys) -> None:
    code, out, _ = run(capsys, "info", "--config", "npu4", "--json")
    assert code == 0 and isa.NPUConfig.from_dict(json.loads(out)) == isa.PRESETS["npu4"]
    code, out, _ = run(capsys, "info", "--json")
    data = json.loads(out)
    assert data["versions"]["numpy"] == metadata.version("numpy")
    assert data["presets"]["npu16"] == isa.PRESETS["npu16"].to_dict()
    code, out, _ = run(capsys, "info", "--config", "npu32")
    assert code == 0 and "spad_rows" in out and "16384" in out


def test_info_bad_config(capsys, tmp_path) -> None:
    code, out, err = run(capsys, "info", "--config", "npu5")
    assert code == 2 and err.startswith("npu: error: ") and "unknown config 'npu5'" in err
    assert "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": 3, "cols": 3}')
    code, _, err = run(capsys, "info", "--config", str(bad))
    assert code == 2 and "NPUConfig.rows must be a power of two" in err


def test_isa(capsys) -> None:
    code, out, _ = run(capsys, "isa")
    assert code == 0
    for op in isa.Opcode:
        assert f" {op.name} " in out
    assert "n_inner * n_outer" in out and "busy + rows + cols" in out
    for fault in isa.Fault:
        assert f"{int(fault)} {fault.name}" in out
    code, out, _ = run(capsys, "isa", "--markdown")
    assert code == 0 and isa.instruction_table_markdown() in out
    assert "| 3 | TOKEN_DEADLOCK |" in out


def test_asm_and_disasm_round_trip(capsys, tmp_path, repo: Path) -> None:
    npub = tmp_path / "hello.npub"
    code, out, _ = run(capsys, "asm", str(repo / "examples" / "hello.s"), "-o", str(npub))
    assert code == 0 and "8 instructions" in out
    reference = assemble_file(repo / "examples" / "hello.s").to_bytes()
    assert npub.read_bytes() == reference
    code, text, _ = run(capsys, "disasm", str(npub))
    assert code == 0 and text.startswith("# NPU program") and "MATMUL" in text
    src = tmp_path / "again.s"
    code, _, _ = run(capsys, "disasm", str(npub), "-o", str(src), "--config", "npu16")
    assert code == 0 and src.read_text() == text
    code, _, _ = run(capsys, "asm", str(src))  # default output: again.npub
    assert code == 0 and (tmp_path / "again.npub").read_bytes() == reference


def test_disasm_segment_files(capsys, tmp_path, repo: Path) -> None:
    npub = tmp_path / "h.npub"
    assert run(capsys, "asm", str(repo / "examples" / "hello.s"), "-o", str(npub))[0] == 0
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, _ = run(capsys, "disasm", str(npub), "-o", str(out_dir / "h.s"), "--segment-files")
    assert code == 0
    text = (out_dir / "h.s").read_text()
    assert "file=h.seg0.bin" in text and "file=h.seg1.bin" in text
    assert (out_dir / "h.seg1.bin").stat().st_size == 192
    assert run(capsys, "asm", str(out_dir / "h.s"), "-o", str(tmp_path / "r.npub"))[0] == 0
    assert (tmp_path / "r.npub").read_bytes() == npub.read_bytes()
    code, _, err = run(capsys, "disasm", str(npub), "--segment-files")
    assert code == 2 and "--segment-files needs -o" in err


def test_asm_errors(capsys, tmp_path) -> None:
    src = tmp_path / "prog.s"
    src.write_text("# a comment\nHALT\nMATMUL n_inner=70000\n")
    code, out, err = run(capsys, "asm", str(src))
    assert code == 2 and out == ""
    assert err.startswith("npu: error: ") and f"{src}:3: MATMUL.n_inner=70000 out of range" in err
    assert not (tmp_path / "prog.npub").exists()
    code, _, err = run(capsys, "asm", str(tmp_path / "missing.s"))
    assert code == 2 and "cannot read assembly" in err
    src.write_text(".config npu16\nHALT\n")
    code, _, err = run(capsys, "asm", str(src), "--config", "npu4")
    assert code == 2 and "differs from the requested config npu4" in err
    code, _, err = run(capsys, "asm", str(src), "-o", str(src))
    assert code == 2 and "would overwrite the source" in err
    code, _, err = run(capsys, "asm", str(src), "-o", str(tmp_path / "no" / "dir" / "x.npub"))
    assert code == 2 and "cannot write" in err


def test_disasm_errors(capsys, tmp_path, hello_program: Program) -> None:
    path = tmp_path / "p.npub"
    data = bytearray(hello_program.to_bytes())
    path.write_bytes(data)
    code, _, err = run(capsys, "disasm", str(path), "--config", "npu4")
    assert code == 2 and "built for config 'npu16', not 'npu4'" in err
    data[100] ^= 0xFF
    path.write_bytes(data)
    code, out, err = run(capsys, "disasm", str(path))
    assert code == 2 and out == "" and "checksum mismatch" in err and "Traceback" not in err
    path.write_bytes(b"hello")
    code, _, err = run(capsys, "disasm", str(path))
    assert code == 2 and "npu: error: ProgramError: file is truncated" in err


def test_demo(capsys) -> None:
    if importlib.util.find_spec("npu.models.cli") is not None:
        pytest.skip("the demo is npu.models.cli's (tested there); this tests npu.tools' demo")
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "reassembled to identical bytes" in out
    assert "LD 3, EX 2, VX 1, ST 1" in out
    # Timing lines come from npu.isa.timing: MATMUL of 8 rows on npu16 is busy 8, latency 40.
    assert any(line.split()[2:7] == ["MATMUL", "EX", "EX_ARRAY", "8", "40"]
               for line in out.splitlines() if line[:1].isdigit())


@pytest.mark.parametrize("command", ["info", "isa", "asm", "disasm"])
def test_help(capsys, command: str) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: npu {command}")
    assert ("--markdown" if command == "isa" else "--config") in out


def test_top_level(capsys) -> None:
    assert main([]) == 1
    out = capsys.readouterr().out
    for command in ("info", "isa", "asm", "disasm"):
        assert command in out
    with pytest.raises(SystemExit) as info:
        main(["asm"])  # missing argument: argparse's usage error
    assert info.value.code == 2
    assert "the following arguments are required: source" in capsys.readouterr().err


def test_words_survive_the_cli(capsys, tmp_path) -> None:
    """Every opcode goes through asm -> .npub -> disasm -> asm unchanged."""
    src = tmp_path / "all.s"
    src.write_text("""
        .config npu4
        .dram_bytes 1024
        LOAD    dram_addr=16 n_inner=2 row_bytes=4 dram_stride_inner=4 signal=EX
        GATHER  index_addr=64 n=2 row_bytes=4 row_stride=4 dst=8 mem=SPAD
        PRELOAD spad_addr=8 wait=LD
        MATMUL  n_inner=2 swap=1 accumulate=1 signal=VX
        VECTOR  acc_addr=0 spad_addr=20 param_addr=4 n=2 zero_point=-5 wait=EX
        ELTWISE func=ADD a_addr=20 b_addr=0 dst=30 n_inner=2 a_mult=8388607 shift=31 signal=ST
        STORE   src=30 n_inner=2 row_bytes=4 dram_addr=512 dram_stride_inner=4 wait=VX
        SYNC    engine=ST signal=LD
        BARRIER
        HALT
    """)
    assert run(capsys, "asm", str(src))[0] == 0
    words = Program.from_bytes((tmp_path / "all.npub").read_bytes()).instructions
    assert sorted(set((words[:, 0] & 0xF).tolist())) == list(range(1, 11))
    code, text, _ = run(capsys, "disasm", str(tmp_path / "all.npub"))
    (tmp_path / "back.s").write_text(text)
    assert run(capsys, "asm", str(tmp_path / "back.s"))[0] == 0
    assert np.array_equal(Program.from_bytes((tmp_path / "back.npub").read_bytes()).instructions,
                          words)
