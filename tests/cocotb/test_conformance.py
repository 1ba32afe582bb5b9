"""RTL against runtime on whole programs (the fast subset of ``npu conformance``).

Every program runs on the simulation top (``npu.hw.simtop.NPUSimTop`` under Verilator, one
simulator process per batch, no Python per cycle) and on the numba runtime; they must agree on
every byte of DRAM, SPAD and ACC, the total cycle count, every instruction's dispatch, ready,
start, completion and retire cycles, and the fault record. ``make conformance`` runs the full
corpus (``npu conformance``); these tests keep to npu4 and a few minutes.
"""

from __future__ import annotations

import os

import pytest

from npu.conformance import example_cases, gather_race_case, random_cases
from npu.isa import Fault
from npu.randprog import FAULT_KINDS, fault_program, random_inputs
from npu.verify import Case, simulator_available, verify_cases

SIM = os.environ.get("NPU_SIM", "verilator")
pytestmark = pytest.mark.simulator_required


@pytest.fixture(autouse=True)
def _simulator() -> None:
    why = simulator_available(SIM)
    if why:
        pytest.skip(why)


def _assert_all_equal(verdicts: list) -> None:
    failed = [v for v in verdicts if not v.ok]
    assert not failed, f"{len(failed)} of {len(verdicts)} differ:\n" + "\n".join(
        v.report() for v in failed[:5])


def test_random_programs_and_examples_npu4() -> None:
    """A fast corpus on npu4: random programs of every category and the GEMM example."""
    cases = [c for c in random_cases("npu4", 60, seed=11) if c.category != "fault/race"]
    cases += example_cases("npu4")
    verdicts = verify_cases(cases, sim=SIM, batch=100)
    assert len(verdicts) == len(cases)
    _assert_all_equal(verdicts)


@pytest.mark.parametrize("kind", FAULT_KINDS, ids=lambda k: k.name)
def test_faults_same_code_cycle_and_index(kind: Fault) -> None:
    """Each fault code, provoked several ways: the RTL's status register holds the runtime's
    (code, cycle, instruction index)."""
    import numpy as np

    cases = []
    for seed in range(6):
        rng = np.random.default_rng([seed, int(kind)])
        prog = fault_program(rng, "npu4", kind)
        cases.append(Case(f"{kind.name}/{seed}", prog, random_inputs(rng, prog),
                          validate=False))
    verdicts = verify_cases(cases, sim=SIM)
    _assert_all_equal(verdicts)
    assert all(v.fault.startswith(kind.name) for v in verdicts), [v.fault for v in verdicts]


def test_gather_fault_wins_over_a_later_fault() -> None:
    """A bad GATHER index faults at the GATHER's start, even though the LD unit only sees the
    index later and another fault (illegal instruction, bad address, watchdog, token overflow)
    comes first in hardware time: the control holds that one until the GATHER's check ends."""
    cases = [gather_race_case("npu4", 0, i) for i in range(8)]
    _assert_all_equal(verify_cases(cases, sim=SIM))


@pytest.mark.slow
def test_examples_npu16() -> None:
    """hello.s and the GEMM example on npu16 (a second build of the simulation top)."""
    _assert_all_equal(verify_cases(example_cases("npu16"), sim=SIM))
