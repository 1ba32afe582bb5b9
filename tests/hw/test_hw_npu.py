"""Whole programs on NPUSimTop (the NPU, the DRAM model and the trace memories, all inside
Amaranth's simulator) against the reference interpreter: final DRAM, SPAD and ACC, total cycles,
and every instruction's dispatch, ready, start, completion and retire cycle; fault records for
programs that fault; the tiled GEMM example against numpy."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from npu.hw.simtop import run
from npu.isa import Engine, Fault, Instr, Opcode, encode_words, get_config
from npu.program import Program, Segment
from npu.randprog import FAULT_KINDS, fault_program, random_inputs, random_program
from npu.runtime.io import initial_state
from npu.runtime.reference import run_reference
from npu.runtime.result import NPUFault

TRACE = ("dispatch", "ready", "start", "complete", "retire")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gemm.py"


def run_both(program: Program, inputs: dict) -> tuple:
    """(reference result or None, reference fault key or None, hardware result)."""
    try:
        ref, ref_fault = run_reference(program, inputs, validate=False), None
    except NPUFault as exc:
        ref, ref_fault = None, exc.key()
    dram, _, _ = initial_state(program, inputs)
    hw = run(program.config, program.instructions, dram, dram_bytes=program.dram_bytes,
             watchdog=program.config.watchdog_cycles, read_memories=ref is not None)
    return ref, ref_fault, hw


def assert_same_run(program: Program, inputs: dict) -> object:
    ref, ref_fault, hw = run_both(program, inputs)
    assert ref_fault is None and hw.done, (ref_fault, hw.fault_key())
    assert hw.cycles == ref.cycles
    assert np.array_equal(hw.dram[:program.dram_bytes], ref.dram)
    assert np.array_equal(hw.spad, ref.spad)
    assert np.array_equal(hw.acc, ref.acc)
    for ev in TRACE:
        mine, theirs = hw.trace[ev][:program.n_instructions], getattr(ref.trace, ev)
        bad = np.flatnonzero(mine != theirs)
        assert not bad.size, f"{ev} differs at {bad[:5]}: hw {mine[bad[:5]]} ref {theirs[bad[:5]]}"
    return hw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_programs_match_the_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    program = random_program(rng, "npu4", 30)
    assert_same_run(program, random_inputs(rng, program))


def test_random_program_on_an_odd_config() -> None:
    # Narrow DRAM beats (2 bytes: multi-beat rows and indices), short latencies, small queues.
    cfg = dataclasses.replace(get_config("npu4"), name="odd4", dram_beat_bytes=2,
                              dram_latency=3, queue_depth=2, retire_depth=3, vx_depth=1)
    rng = np.random.default_rng(7)
    program = random_program(rng, cfg, 30)
    assert_same_run(program, random_inputs(rng, program))


@pytest.mark.parametrize("kind", FAULT_KINDS, ids=[k.name for k in FAULT_KINDS])
def test_faults_match_the_reference(kind: Fault) -> None:
    rng = np.random.default_rng(11 + int(kind))
    program = fault_program(rng, "npu4", kind)
    _, ref_fault, hw = run_both(program, random_inputs(rng, program))
    assert ref_fault is not None and ref_fault[0] == int(kind)
    assert hw.fault_key() == ref_fault


def test_gather_index_fault_matches_the_reference() -> None:
    for seed in range(50):
        rng = np.random.default_rng(seed)
        program = fault_program(rng, "npu4", Fault.ADDRESS_OUT_OF_RANGE)
        if program.metadata.get("variant") == "gather_index":
            break
    else:
        pytest.skip("no gather_index variant drawn")
    _, ref_fault, hw = run_both(program, random_inputs(rng, program))
    assert hw.fault_key() == ref_fault


@pytest.mark.parametrize("gap", [0, 3])
def test_bad_gather_index_precedes_a_later_dispatch_fault(gap: int) -> None:
    # The GATHER starts at cycle 1; an illegal word is dispatched `gap` cycles later, long
    # before the GATHER has read its indices. The contract's order: the GATHER faults first.
    cfg = get_config("npu4")
    idx = np.array([0, 5000], dtype="<i4").tobytes()
    gather = Instr(Opcode.GATHER, 0, 0, dict(dram_addr=64, index_addr=0, row_stride=4, dst=0,
                                             n=2, row_bytes=4, mem=0))
    sync = Instr(Opcode.SYNC, 0, 0, {"engine": int(Engine.EX)})
    words = encode_words([gather] + [sync] * gap + [sync])
    words[-1] = 0                                    # opcode 0: illegal
    program = Program(cfg, words, 256, segments=[Segment("idx", 0, idx)])
    _, ref_fault, hw = run_both(program, {})
    assert ref_fault == (int(Fault.ADDRESS_OUT_OF_RANGE), 1, 0)
    assert hw.fault_key() == ref_fault


def _gemm():
    spec = importlib.util.spec_from_file_location("gemm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("M", "K", "N", "kw"), [
    (8, 8, 8, {}),
    (13, 9, 7, {"relu": True}),
])
def test_gemm_example_matches_numpy_and_the_reference(M: int, K: int, N: int, kw: dict) -> None:
    program, inputs, expected = _gemm().build_gemm("npu4", M, K, N, seed=M + K + N, **kw)
    hw = assert_same_run(program, inputs)
    b = next(b for b in program.outputs if b.name == "C")
    out = hw.dram[b.addr:b.addr + b.nbytes].view(np.int8).reshape(b.shape)
    assert np.array_equal(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 23))
def test_more_random_programs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    program = random_program(rng, "npu4", 60)
    assert_same_run(program, random_inputs(rng, program))


@pytest.mark.slow
def test_gemm_example_16x16x16() -> None:
    program, inputs, expected = _gemm().build_gemm("npu4", 16, 16, 16, seed=1)
    assert_same_run(program, inputs)
