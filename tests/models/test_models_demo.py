"""``npu demo``: the quick variant end to end (the full one is slow)."""

from __future__ import annotations

import json

import pytest

from npu.cli import main

pytest.importorskip("npu.compiler.session")


def test_quick_demo_writes_traces_plots_and_renders(tmp_path, capsys) -> None:
    from npu.models.demo import run_demo

    lines: list[str] = []
    results = run_demo(tmp_path, quick=True, echo=lines.append)
    assert [r.name for r in results] == ["digits_cnn", "nerf_scene", "gcn_karate"]
    assert all(r.error is None for r in results), [r.error for r in results]
    text = "\n".join(lines)
    for word in ("where each node ran", "cycles per run", "utilization", "DRAM read",
                 "NPU accuracy", "PSNR NPU vs float", str(tmp_path)):
        assert word in text
    for r in results:
        assert r.cycles > 0 and 0 < r.utilization <= 1.0 and r.dram_read > 0
        assert r.placement and any(p["where"].startswith("npu") for p in r.placement)
        assert all(f.exists() and f.stat().st_size > 0 for f in r.files)
    nerf = results[1]
    assert nerf.accuracy["PSNR NPU vs float (dB)"] >= 30
    assert (tmp_path / "nerf_npu.png").exists() and (tmp_path / "nerf_float.png").exists()
    trace = json.loads((tmp_path / "nerf_scene.trace.json").read_text())
    assert trace["traceEvents"]


def test_demo_cli_rejects_unknown_models(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--models", "lenet"]) == 2
    assert "unknown demo model" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_via_cli(tmp_path) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nerf_truth_float_npu.png").exists()
    assert (tmp_path / "digits_cnn.trace.json").exists()
