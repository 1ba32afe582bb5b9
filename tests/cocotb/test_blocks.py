"""Block testbenches of the RTL, launched from pytest through cocotb's runner.

Each block (systolic array, DMA engines, vector unit, control: dispatcher + tokens) is built
once into a Verilator model (cached under build/rtl/, see ``harness.py``) and driven by its
cocotb testbench (``tb_<block>.py``): constrained-random stimulus, a monitor and a scoreboard
against ``npu.numerics`` / the reference interpreter, and functional coverage. This launcher
fails when the testbench reports a mismatch (the message carries the random seed; set
``NPU_TB_SEED`` to replay it) or when the coverage has a bin that was neither hit nor waived.

``NPU_SIM=icarus`` runs the same testbenches on Icarus Verilog (skipped when not installed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from npu.coverage import Coverage
from npu.verify import run_cocotb, simulator_available

HERE = Path(__file__).resolve().parent
SIM = os.environ.get("NPU_SIM", "verilator")
REPORTS = HERE.parent.parent / "build" / "coverage"

pytestmark = pytest.mark.simulator_required

#: Block -> cycles (or programs) of stimulus per run: enough to hit every coverage bin.
STIMULUS = {"array": 4000, "vector": 100, "dma": 200, "control": 40}


def run_block(block: str, tmp_path: Path, **extra: object) -> dict:
    """Build (or reuse) the block's harness, run its testbench and return its coverage."""
    why = simulator_available(SIM)
    if why:
        pytest.skip(why)
    sys.path.insert(0, str(HERE))
    try:
        import harness
    finally:
        sys.path.remove(str(HERE))
    from cocotb_tools.runner import get_results

    build, cfg = harness.build(block, SIM)
    cov_file = tmp_path / "coverage.json"
    tb_params = {**cfg.to_dict(), "amount": STIMULUS[block], "dram_size": harness.DRAM_SIZE,
                 **extra}
    env = {"NPU_TB_PARAMS": json.dumps(tb_params), "NPU_TB_COVERAGE": str(cov_file),
           "NPU_TB_SEED": os.environ.get("NPU_TB_SEED", ""),
           "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    xml = run_cocotb(build, f"tb_{block}", env, test_dir=tmp_path)
    tests, failed = get_results(xml)
    log = (tmp_path / "sim.log").read_text(errors="replace")
    if failed or not tests:
        errors = [line for line in log.splitlines() if "ERROR" in line or "Error" in line]
        pytest.fail(f"{block} testbench: {failed} of {tests} test(s) failed\n"
                    + "\n".join(errors[-30:]))
    assert cov_file.exists(), f"{block} testbench saved no coverage"
    data = json.loads(cov_file.read_text())
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{block}.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return data


def _check_coverage(block: str, data: dict) -> None:
    cov = Coverage(data["name"])
    # Rebuild just enough to reuse the report and hole logic on the saved counts.
    cov.hits, cov.waived, cov.samples = data["hits"], data["waived"], data["samples"]
    report = cov.report()
    (REPORTS / f"{block}.txt").write_text(report + "\n")
    print(report)
    assert not cov.missed(), f"coverage holes (neither hit nor waived): {cov.missed()}\n{report}"


@pytest.mark.parametrize("block", list(STIMULUS))
def test_block(block: str, tmp_path: Path) -> None:
    """The block's testbench passes and its coverage has no unexplained hole."""
    _check_coverage(block, run_block(block, tmp_path))
