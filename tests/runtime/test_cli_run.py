"""``npu run`` and ``npu profile``: outputs, summaries, error messages and exit statuses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from npu.builder import ProgramBuilder
from npu.cli import main
from npu.program import Program, save
from npu.runtime import NPUFault
from npu.runtime import cli as rcli
from npu.runtime.reference import run_reference

REF = ["--engine", "reference"]


def copy_program() -> Program:
    """y = x (8x4 int8): LOAD x into SPAD, STORE it to y; labelled region "copy"."""
    b = ProgramBuilder("npu4")
    x = b.input("x", (8, 4), "int8")
    y = b.output("y", (8, 4), "int8")
    b.region("copy")
    b.load(dram_addr=x.addr, dst=0, n_inner=8, row_bytes=4, dram_stride_inner=4, signal="ST")
    b.store(src=0, n_inner=8, row_bytes=4, dram_addr=y.addr, dram_stride_inner=4, wait="LD")
    return b.build()


def deadlock_program() -> Program:
    """A MATMUL waits for an LD token that no instruction gives: TOKEN_DEADLOCK."""
    b = ProgramBuilder("npu4", dram_bytes=64)
    b.region("setup")
    b.load(dst=0, n_inner=4, row_bytes=4, fill=1)
    b.region("stuck layer")
    b.preload(0)
    b.matmul(spad_addr=0, n_inner=4, acc_addr=0, swap=1, wait="LD")
    return b.build()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    prog = tmp_path / "copy.npub"
    save(copy_program(), prog)
    x = np.arange(32, dtype=np.int8).reshape(8, 4) - 16
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "bad.npy", np.zeros((4, 8), np.int8))
    np.save(tmp_path / "big.npy", np.full((8, 4), 300, np.int16))
    stuck = tmp_path / "stuck.npub"
    save(deadlock_program(), stuck)
    return {"prog": prog, "x": tmp_path / "x.npy", "bad": tmp_path / "bad.npy",
            "big": tmp_path / "big.npy", "stuck": stuck, "dir": tmp_path}


def test_run_writes_outputs(files, capsys):
    out = files["dir"] / "out"
    code = main(["run", str(files["prog"]), "--input", f"x={files['x']}", "--output-dir",
                 str(out), *REF])
    text = capsys.readouterr().out
    assert code == 0
    x = np.load(files["x"])
    np.testing.assert_array_equal(np.load(out / "y.npy"), x)
    cycles = run_reference(copy_program(), {"x": x}).cycles
    assert f"{cycles:,} cycles" in text
    assert "DRAM read 32 B" in text and "written 32 B" in text
    assert "output y (8, 4) int8" in text


def test_run_numba_engine_matches_reference(files, capsys):
    pytest.importorskip("numba")
    out = files["dir"] / "n"
    assert main(["run", str(files["prog"]), "-i", f"x={files['x']}", "-o", str(out)]) == 0
    cycles = run_reference(copy_program(), {"x": np.load(files["x"])}).cycles
    assert f"{cycles:,} cycles" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out / "y.npy"), np.load(files["x"]))


@pytest.mark.parametrize("extra, message", [
    ([], "missing input 'x'"),
    (["--input", "x={x}", "--input", "z={x}"], "unknown input 'z'"),
    (["--input", "x={bad}"], "input 'x': shape (4, 8) does not match"),
    (["--input", "x={big}"], "input 'x': values [300, 300] are outside the int8 range"),
    (["--input", "x"], "--input expects NAME=FILE.npy, got 'x'"),
    (["--input", "x={x}", "--input", "x={x}"], "input 'x' is given twice"),
    (["--input", "x=/nonexistent.npy"], "input 'x': cannot read '/nonexistent.npy'"),
])
def test_run_input_errors(files, capsys, extra, message):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in extra]
    code = main(["run", str(files["prog"]), *args, *REF])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err


def test_run_missing_program(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.npub"), *REF]) == 2
    assert "not found" in capsys.readouterr().err


def test_run_fault_prints_instruction(files, capsys):
    code = main(["run", str(files["stuck"]), *REF])
    err = capsys.readouterr().err
    assert code == 3
    fault = pytest.raises(NPUFault, run_reference, deadlock_program()).value
    assert f"TOKEN_DEADLOCK (code 3) at cycle {fault.cycle}" in err
    assert f"instruction {fault.index} in region 'stuck layer': MATMUL" in err
    assert "wait=LD" in err


def test_run_watchdog(files, capsys):
    code = main(["run", str(files["prog"]), "-i", f"x={files['x']}", "--watchdog", "5", *REF])
    err = capsys.readouterr().err
    assert code == 3
    assert "WATCHDOG (code 4) at cycle 5" in err and "region 'copy'" in err


def test_profile_writes_everything(files, capsys):
    d = files["dir"]
    code = main(["profile", str(files["prog"]), "-i", f"x={files['x']}", "--trace",
                 str(d / "t.json"), "--plot", str(d / "p.png"), "--json", str(d / "p.json"),
                 *REF])
    text = capsys.readouterr().out
    assert code == 0
    cycles = run_reference(copy_program(), {"x": np.load(files["x"])}).cycles
    data = json.loads((d / "p.json").read_text())
    assert data["totals"]["cycles"] == cycles and data["totals"]["dram_read"] == 32
    assert [r["label"] for r in data["regions"]] == ["copy"]
    trace = json.loads((d / "t.json").read_text())
    assert {e["name"] for e in trace["traceEvents"] if e.get("cat") == "instruction"} == \
        {"LOAD", "STORE", "HALT"}
    assert (d / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert lines["total"][5] == f"{cycles:,}"
    assert "ui.perfetto.dev" in text


def test_profile_feeds_zeros_without_inputs(files, capsys):
    assert main(["profile", str(files["prog"]), *REF]) == 0
    captured = capsys.readouterr()
    assert "feeding zeros to x" in captured.err
    assert "copy" in captured.out


def test_profile_partial_inputs_and_onnx(files, tmp_path, capsys):
    assert main(["profile", str(files["prog"]), "-i", f"z={files['x']}", *REF]) == 2
    assert "unknown input 'z'" in capsys.readouterr().err
    model = tmp_path / "m.onnx"
    model.write_bytes(b"")
    if ".onnx" not in rcli._SOURCES:
        assert main(["profile", str(model)]) == 2
        assert "needs the compiler" in capsys.readouterr().err


def test_profile_fault_exit_status(files, capsys):
    assert main(["profile", str(files["stuck"]), *REF]) == 3
    assert "TOKEN_DEADLOCK" in capsys.readouterr().err


def test_registered_source(files, tmp_path, capsys, monkeypatch):
    """A higher layer routes its own suffix through `npu profile` (as the compiler does for
    .onnx) and adds options to the profile parser."""
    monkeypatch.setattr(rcli, "_SOURCES", {})
    seen: dict[str, argparse.Namespace] = {}

    def fake_run(args: argparse.Namespace):
        seen["args"] = args
        return run_reference(copy_program(), {"x": np.load(files["x"])})

    rcli.register_profile_source(
        ".fake", fake_run, lambda p: p.add_argument("--fake-level", type=int, default=0))
    model = tmp_path / "model.fake"
    assert main(["profile", str(model), "--fake-level", "3", "--json",
                 str(tmp_path / "f.json"), *REF]) == 0
    assert seen["args"].fake_level == 3 and seen["args"].engine == "reference"
    assert "Profile of model.fake" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["name"] == "model.fake"


def test_profile_result_reusable(capsys, tmp_path):
    result = run_reference(copy_program(), {"x": np.zeros((8, 4), np.int8)})
    prof = rcli.profile_result(result, argparse.Namespace(name="session",
                                                         json=str(tmp_path / "s.json")))
    out = capsys.readouterr().out
    assert out.startswith("Profile of session on npu4")
    assert prof.cycles == result.cycles
    with pytest.raises(rcli.UsageError, match="cannot write profile JSON"):
        rcli.profile_result(result, argparse.Namespace(json=str(tmp_path / "s.json" / "x")))
