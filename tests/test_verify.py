"""The verification machinery without a simulator: comparison and reporting, the Verilog
post-processing, functional coverage, and the conformance corpus.

The RTL side is played by the runtime's own result, copied and then altered, so every
comparison rule is checked both ways (equal passes; each kind of difference is caught and
reported with the instruction, cycle and address).
"""

from __future__ import annotations

import numpy as np
import pytest

from npu.conformance import (
    MIX,
    RACE_KINDS,
    corpus_coverage,
    gather_race_case,
    random_cases,
    sample_coverage,
    summary_line,
)
from npu.coverage import Coverage
from npu.randprog import random_inputs, random_program
from npu.verify import Case, RTLRun, compact_initials, compare, run_runtime


def _case(seed: int = 3) -> Case:
    rng = np.random.default_rng(seed)
    prog = random_program(rng, "npu4", 40)
    return Case("c", prog, random_inputs(rng, prog))


def _mirror(exp) -> RTLRun:
    """An RTLRun equal to the runtime's outcome."""
    res = exp.result
    n = res.program.n_instructions
    trace = np.stack([getattr(res.trace, ev)[:n] for ev in
                      ("dispatch", "ready", "start", "complete", "retire")])
    return RTLRun(done=True, cycles=res.cycles, trace=trace.copy(), dram=res.dram.copy(),
                  spad=res.spad.view(np.uint8).copy(), acc=res.acc.view(np.uint8).copy())


def test_equal_outcomes_pass() -> None:
    case = _case()
    exp = run_runtime(case)
    v = compare(case, exp, _mirror(exp))
    assert v.ok and not v.cycle_mismatch and not v.problems


def test_dram_difference_names_address_and_writer() -> None:
    case = _case()
    exp = run_runtime(case)
    rtl = _mirror(exp)
    # A byte some STORE wrote: flip it.
    written = np.flatnonzero(exp.result.dram != exp.image)
    assert written.size, "the program should store something"
    a = int(written[0])
    rtl.dram[a] ^= 0xFF
    v = compare(case, exp, rtl)
    assert not v.ok and not v.cycle_mismatch
    assert f"DRAM byte 0x{a:x}" in v.problems[0]
    assert "last written by instruction" in v.problems[0] and "STORE" in v.problems[0]


def test_timing_difference_names_instruction_and_cycle() -> None:
    case = _case()
    exp = run_runtime(case)
    rtl = _mirror(exp)
    i = int(np.flatnonzero(exp.result.trace.start >= 0)[5])
    rtl.trace[2, i] += 1           # start one cycle late
    rtl.trace[4, i + 1] += 3       # and another instruction retiring late
    v = compare(case, exp, rtl)
    assert not v.ok and v.cycle_mismatch
    text = v.problems[0]
    assert "2 instruction(s)" in text and f"instruction {i}:" in text
    assert f"start runtime {exp.result.trace.start[i]} RTL {exp.result.trace.start[i] + 1}" \
        in text


def test_total_cycles_and_fault_differences() -> None:
    case = _case()
    exp = run_runtime(case)
    rtl = _mirror(exp)
    rtl.cycles += 1
    v = compare(case, exp, rtl)
    assert v.cycle_mismatch and "total cycles differ" in " ".join(v.problems)
    rtl = _mirror(exp)
    rtl.done, rtl.fault_code, rtl.fault_cycle, rtl.fault_index = False, 3, 17, 2
    v = compare(case, exp, rtl)
    assert not v.ok and "TOKEN_DEADLOCK at cycle 17, instruction 2" in v.problems[0]
    assert "no fault" in v.problems[0]


def test_fault_records_compared() -> None:
    case = gather_race_case("npu4", 0, 0)
    exp = run_runtime(case)
    assert exp.fault is not None
    code, cycle, index = exp.fault.key()
    same = RTLRun(fault_code=code, fault_cycle=cycle, fault_index=index)
    assert compare(case, exp, same).ok
    later = RTLRun(fault_code=code, fault_cycle=cycle + 1, fault_index=index)
    v = compare(case, exp, later)
    assert not v.ok and v.cycle_mismatch


def test_hang_and_testbench_errors_fail() -> None:
    case = _case()
    exp = run_runtime(case)
    assert not compare(case, exp, RTLRun(hang=True)).ok
    v = compare(case, exp, RTLRun(error="Traceback ..."))
    assert not v.ok and "testbench error" in v.problems[0]


def test_compact_initials() -> None:
    src = ("module m;\n  reg [7:0] mem [2:0];\n  initial begin\n    mem[0] = 8'h00;\n"
           "    mem[1] = 8'h00;\n    mem[2] = 8'h00;\n  end\n"
           "  reg [7:0] rom [1:0];\n  initial begin\n    rom[0] = 8'h01;\n    rom[1] = 8'h02;\n"
           "  end\nendmodule\n")
    out = compact_initials(src)
    assert "for (i = 0; i < 3; i = i + 1)" in out and "mem[i] = 8'h00;" in out
    assert "rom[0] = 8'h01;" in out and "rom[1] = 8'h02;" in out   # differing values kept
    assert "mem[1]" not in out


def test_coverage_bins_crosses_waivers() -> None:
    cov = Coverage("t")
    cov.point("n", {"1": lambda n: n == 1, "big": lambda n: n > 8})
    cov.point("op", ["A", "B"], waive={"B": "not built yet"})
    cov.cross("op x n", ("op", "n"))
    cov.sample(op="A", n=1)
    cov.sample(n=3)                       # no bin, no cross (op not sampled)
    assert cov.hits["n"] == {"1": 1, "big": 0}
    assert cov.hits["op x n"]["A x 1"] == 1
    assert "n: big" in cov.missed() and "op: B" not in cov.missed()
    assert cov.counts() == (3, 1, 8)
    report = cov.report()
    assert "MISSED: big" in report and "waived: B (not built yet)" in report
    other = Coverage("t2")
    other.point("n", {"1": lambda n: n == 1, "big": lambda n: n > 8})
    other.sample(n=9)
    cov.merge(other)
    assert cov.hits["n"]["big"] == 1
    with pytest.raises(KeyError):
        cov.sample(nope=1)


def test_corpus_is_deterministic_and_mixed() -> None:
    a = random_cases("npu4", 40, seed=5)
    b = random_cases("npu4", 40, seed=5)
    assert [c.name for c in a] == [c.name for c in b]
    assert all(np.array_equal(x.program.instructions, y.program.instructions)
               for x, y in zip(a, b))
    cats = {c.category.split("/")[0] for c in a}
    assert cats == {name for name, _ in MIX}
    assert {c.name.split("/")[3] for c in a if c.category == "fault/race"} == set(RACE_KINDS)
    cov = corpus_coverage()
    for c in a:
        sample_coverage(cov, c, run_runtime(c))
    assert cov.hits["outcome"]["done"] > 0 and cov.hits["outcome"]["WATCHDOG"] > 0
    assert cov.hits["feature"]["VECTOR.fp32"] > 0 and cov.hits["feature"]["VECTOR.fixed_point"]
    assert cov.hits["feature"]["ELTWISE.add_mult_max"] > 0
    assert cov.hits["feature"]["ELTWISE.add_shift_max"] > 0


def test_summary_line() -> None:
    from npu.verify import Verdict
    vs = [Verdict("a", True), Verdict("b", False, cycle_mismatch=True), Verdict("c", False)]
    assert summary_line(vs) == "conformance passed=1 failed=2 cycle_mismatches=1"


def test_cli_registers_verify_and_conformance() -> None:
    from npu.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["verify", "x.npub", "--sim", "icarus"])
    assert args.sim == "icarus" and args.func.__name__ == "_cmd_verify"
    args = parser.parse_args(["conformance", "--count", "5"])
    assert args.count == 5 and args.configs == "npu4,npu8"


def test_verify_draws_missing_inputs_at_random(tmp_path, monkeypatch, capsys) -> None:
    """`npu verify` fills the inputs it was not given with seeded random data (as its --help
    says) instead of refusing; the RTL run itself is replaced by a recorder here."""
    from npu import verify
    from npu.asm import assemble_file
    from npu.cli import main
    from npu.program import save

    prog = assemble_file("examples/hello.s")
    path = tmp_path / "hello.npub"
    save(prog, path)
    seen: list[Case] = []

    class Recorded(Exception):
        pass

    def record(cases, **_kw):
        seen.extend(cases)
        raise Recorded

    monkeypatch.setattr(verify, "prepare_simulator", lambda sim: None)
    monkeypatch.setattr(verify, "verify_cases", record)
    with pytest.raises(Recorded):
        main(["verify", str(path), "--seed", "3"])
    assert "input x: random (seed 3)" in capsys.readouterr().out
    expected = random_inputs(np.random.default_rng(3), prog)["x"]
    np.testing.assert_array_equal(seen[0].inputs["x"], expected)
