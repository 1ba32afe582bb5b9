"""The onnxruntime-style session, the .npub bundle and the ``npu compile/profile`` commands."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from opmodels import Model, feeds

import npu
from npu.compiler.bundle import load_bundle, save_bundle, segment_paths
from npu.compiler.errors import CompileError
from npu.compiler.session import InferenceSession


def _model() -> onnx.ModelProto:
    m = Model(11)
    x = m.op("Relu", [m.conv(m.input("x", (1, 3, 8, 8)), 3, 16, 3, pads=[1, 1, 1, 1])])
    x = m.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    s = m.op("Sigmoid", [m.conv(x, 16, 16, 1)])          # host, between two segments
    g = m.op("GlobalAveragePool", [m.op("Relu", [m.conv(s, 16, 16, 1)])])
    return m.build([m.op("Softmax", [m.op("Flatten", [g])])])


@pytest.fixture(scope="module")
def session() -> InferenceSession:
    model = _model()
    return InferenceSession(model, "npu16", calibration=feeds(model, np.random.default_rng(0),
                                                              3))


def test_onnxruntime_interface(session: InferenceSession) -> None:
    assert npu.InferenceSession is InferenceSession
    (inp,) = session.get_inputs()
    assert (inp.name, inp.shape, inp.type) == ("x", [1, 3, 8, 8], "tensor(float)")
    (out,) = session.get_outputs()
    assert out.shape == [1, 16] and out.type == "tensor(float)"
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    assert y.shape == (1, 16) and abs(float(y.sum()) - 1) < 0.1
    (y2,) = session.run([out.name], {"x": x})
    np.testing.assert_array_equal(y, y2)
    assert len(session.programs) == 2 and session.cycles > 0
    assert session.profile.cycles == session.results[0].cycles
    assert len(session.profiles) == 2


def test_run_errors_name_the_input(session: InferenceSession) -> None:
    with pytest.raises(CompileError, match="missing input 'x'"):
        session.run(None, {})
    with pytest.raises(CompileError, match="shape"):
        session.run(None, {"x": np.zeros((1, 3, 4, 4), np.float32)})
    with pytest.raises(CompileError, match="unknown input"):
        session.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32), "z": 1})
    with pytest.raises(CompileError, match="unknown output"):
        session.run(["nope"], {"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_report_lists_every_node(session: InferenceSession) -> None:
    rep = session.report()
    ops = {r["op"] for r in rep["nodes"]}
    assert {"Sigmoid", "Softmax", "MaxPool", "GlobalAveragePool"} <= ops | {
        o.split("+")[0] for o in ops}
    hosts = {r["op"] for r in rep["host_fallbacks"]}
    assert "Sigmoid" in hosts and "Softmax" in hosts
    assert "npu:1" in session.report_text()


def test_bundle_round_trip(session: InferenceSession, tmp_path) -> None:
    paths = save_bundle(session.compiled, tmp_path / "m.npub")
    assert paths == segment_paths(tmp_path / "m.npub", 2) and all(p.exists() for p in paths)
    again = InferenceSession(str(paths[0]))
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(again.run(None, {"x": x})[0], session.run(None, {"x": x})[0])
    assert "Sigmoid" in again.report_text()
    assert load_bundle(paths[0]).graph.inputs == ["x"]
    with pytest.raises(CompileError, match="not a compiled model"):
        load_bundle(paths[1])


def test_reference_engine_agrees(session: InferenceSession) -> None:
    ref = InferenceSession(session.compiled, engine="reference")
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(ref.run(None, {"x": x})[0], session.run(None, {"x": x})[0])
    assert ref.cycles == session.cycles


def test_strict_and_config_from_session() -> None:
    model = _model()
    with pytest.raises(CompileError, match="strict mode"):
        InferenceSession(model, "npu16", calibration=1, strict=True)
    small = InferenceSession(model, "npu4", calibration=feeds(model, np.random.default_rng(0),
                                                              2))
    assert small.programs[0].config.name == "npu4"


def _npu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npu.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_cli_compile_and_profile(tmp_path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    data = np.concatenate([f["x"] for f in feeds(model, np.random.default_rng(0), 3)])
    np.savez(tmp_path / "cal.npz", x=data)
    np.save(tmp_path / "x.npy", data[:1])
    out = _npu("compile", str(path), "-o", str(tmp_path / "m.npub"), "--calibration",
               str(tmp_path / "cal.npz"), "--report", "--dump-ir")
    assert out.returncode == 0, out.stderr
    assert "== after tile ==" in out.stdout and "host: " in out.stdout
    assert (tmp_path / "m.npub").exists() and (tmp_path / "m.seg1.npub").exists()
    prof = _npu("profile", str(path), "--input", f"x={tmp_path / 'x.npy'}",
                "--calibration", str(tmp_path / "cal.npz"), "--trace",
                str(tmp_path / "t.json"))
    assert prof.returncode == 0, prof.stderr
    assert "ideal" in prof.stdout and "util" in prof.stdout and (tmp_path / "t.json").exists()
    bad = _npu("compile", str(path), "--strict", "--calibration", str(tmp_path / "cal.npz"))
    assert bad.returncode == 2 and "strict mode" in bad.stderr
