"""Machine faults of the reference interpreter, each with its (code, cycle, index) worked out
by hand from docs/architecture.md; random fault programs in tests/test_randprog.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npu.builder import ProgramBuilder
from npu.isa import LAYOUTS, PRESETS, Engine, Fault, Instr, Opcode, encode
from npu.program import Program, ProgramError
from npu.runtime.reference import run_reference
from npu.runtime.result import NPUFault

NPU4 = PRESETS["npu4"]


def fault_of(program: Program, **kw) -> tuple[int, int, int]:
    """(code, cycle, index) of the fault the program raises, with and without idle skipping."""
    keys = []
    for skip in (True, False):
        with pytest.raises(NPUFault) as info:
            run_reference(program, validate=False, skip_idle=skip, **kw)
        keys.append(info.value.key())
        assert str(info.value).startswith(info.value.code.name)
    assert keys[0] == keys[1]
    return keys[0]


def builder(**changes) -> ProgramBuilder:
    return ProgramBuilder(dataclasses.replace(NPU4, **changes) if changes else NPU4,
                          dram_bytes=256)


def with_word(b: ProgramBuilder, index: int, word: int) -> Program:
    """The builder's program with instruction ``index`` replaced by a raw 256-bit word."""
    prog = b.build(validate=False)
    prog.instructions[index] = np.frombuffer(word.to_bytes(32, "little"), dtype="<u8")
    return prog


def word_of(ins: Instr) -> int:
    return int.from_bytes(encode(ins), "little")


# --------------------------------------------------------------------------------------------
# ILLEGAL_INSTRUCTION (at dispatch)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opcode", [0, 11, 15])
def test_illegal_opcode(opcode: int) -> None:
    b = builder()
    b.sync("LD")
    b.sync("EX")
    b.sync("VX")                       # replaced: dispatcher reaches index 2 at cycle 2
    prog = with_word(b, 2, opcode | (0xABC << 40))
    assert fault_of(prog) == (Fault.ILLEGAL_INSTRUCTION, 2, 2)
    with pytest.raises(ProgramError):  # validated programs never get that far
        run_reference(prog)


def test_reserved_bits_own_engine_and_barrier_tokens() -> None:
    sync_wait = LAYOUTS[Opcode.SYNC]["wait"].lsb
    cases = {
        "reserved": word_of(Instr(Opcode.SYNC, 0, 0, {"engine": 1})) | (1 << 200),
        "own engine": word_of(Instr(Opcode.SYNC, 0, 0, {"engine": 1})) | (1 << (sync_wait + 1)),
        "barrier tokens": int(Opcode.BARRIER) | (1 << 4),
        "load waits on LD": word_of(Instr(Opcode.LOAD, 0, 0, {"n_inner": 1, "n_outer": 1,
                                                              "row_bytes": 1})) | (1 << 4),
    }
    for name, word in cases.items():
        b = builder()
        b.sync("ST")
        b.sync("ST")
        assert fault_of(with_word(b, 1, word)) == (Fault.ILLEGAL_INSTRUCTION, 1, 1), name


def test_running_past_the_end() -> None:
    b = builder()
    b.sync("LD")
    b.sync("LD")
    prog = b.build(validate=False)
    prog.instructions = prog.instructions[:2]          # drop HALT
    assert fault_of(prog) == (Fault.ILLEGAL_INSTRUCTION, 2, 2)
    empty = Program(NPU4, np.zeros((0, 4), dtype=np.uint64), 64)
    assert fault_of(empty) == (Fault.ILLEGAL_INSTRUCTION, 0, 0)


def test_dispatch_fault_waits_for_nothing_but_the_previous_dispatch() -> None:
    # queue_depth 1: LOAD (signals EX once, at 34), two SYNCs on EX waiting for LD: the second
    # never gets a token and stays queued, the EX queue full. The dispatcher still looks at
    # the next instruction the cycle after dispatching the second SYNC (34) and faults at 35.
    b = builder(queue_depth=1)
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="EX")
    b.sync("EX", wait="LD")
    b.sync("EX", wait="LD")
    b.matmul(spad_addr=NPU4.spad_rows, n_inner=1, acc_addr=0)
    assert fault_of(b.build(validate=False)) == (Fault.ADDRESS_OUT_OF_RANGE, 35, 3)


# --------------------------------------------------------------------------------------------
# ADDRESS_OUT_OF_RANGE (static at dispatch; GATHER indices at start)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    dict(dram_addr=0, dst=NPU4.spad_rows - 1, n_inner=2, row_bytes=4),          # last row + 1
    dict(dram_addr=250, dst=0, n_inner=1, row_bytes=8, mem=1),                   # DRAM end
    dict(dram_addr=0, dst=0, n_inner=1, row_bytes=5),                            # row too wide
    dict(dram_addr=0, dst=0, n_inner=0, row_bytes=4),                            # zero rows
    dict(dram_addr=0, dst=NPU4.acc_rows - 3, n_inner=2, n_outer=2, dst_stride_outer=2,
         row_bytes=4, mem=1),                                                    # outer run
])
def test_static_address_errors(fields) -> None:
    b = builder()
    b.sync("ST")
    b.load(**fields)
    assert fault_of(b.build(validate=False)) == (Fault.ADDRESS_OUT_OF_RANGE, 1, 1)


def test_eltwise_partial_overlap_is_an_address_fault() -> None:
    b = builder()
    b.eltwise(a_addr=10, b_addr=40, dst=11, n_inner=4)
    assert fault_of(b.build(validate=False)) == (Fault.ADDRESS_OUT_OF_RANGE, 0, 0)


@pytest.mark.parametrize("bad", [-1, 1 << 30, 61])
def test_gather_bad_index_faults_at_its_start(bad: int) -> None:
    # Table at 12, stride 4, 4-byte rows: index 60 is the last row inside 256 bytes.
    b = builder()
    b.segment("idx", np.array([3, 60, bad], dtype="<i4"), addr=200)
    b.load(dram_addr=0, dst=0, n_inner=2, row_bytes=4)          # s 1, LD_DMA busy until 3
    b.gather(dram_addr=12, index_addr=200, row_stride=4, dst=8, n=3, row_bytes=4)
    # GATHER: dispatched at 1, unit free at 3 -> starts and faults at 3.
    assert fault_of(b.build()) == (Fault.ADDRESS_OUT_OF_RANGE, 3, 1)


def test_gather_good_indices_do_not_fault() -> None:
    b = builder()
    b.segment("idx", np.array([3, 60], dtype="<i4"), addr=200)
    b.gather(dram_addr=12, index_addr=200, row_stride=4, dst=8, n=2, row_bytes=4)
    run_reference(b.build())


# --------------------------------------------------------------------------------------------
# TOKEN_DEADLOCK
# --------------------------------------------------------------------------------------------

def test_deadlock_on_a_missing_token() -> None:
    b = builder()
    b.sync("EX", wait="LD")            # d 0; never gets a token
    # Cycle 1: nothing starts, HALT is dispatched. Cycle 2: nothing at all, nothing in flight.
    assert fault_of(b.build()) == (Fault.TOKEN_DEADLOCK, 2, 0)


def test_deadlock_detected_after_the_last_retirement() -> None:
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4)     # s 1, c = r = 34
    b.sync("ST", wait="VX")                                # 1: waits forever
    b.sync("ST")                                           # 2: behind it
    # HALT dispatched at 3; the LOAD retires at 34; cycle 35 is the first dead one.
    assert fault_of(b.build()) == (Fault.TOKEN_DEADLOCK, 35, 1)


def test_deadlock_of_two_engines_waiting_for_each_other() -> None:
    b = builder()
    b.sync("LD")                                            # 0: s 1, r 2
    b.sync("VX", wait="ST", signal="ST")                    # 1
    b.sync("ST", wait="VX", signal="VX")                    # 2
    # Dispatch at 0, 1, 2 and HALT at 3; 0 retires at 2; cycle 4 is the first idle one.
    assert fault_of(b.build()) == (Fault.TOKEN_DEADLOCK, 4, 1)


def test_deadlock_index_is_the_dispatcher_when_nothing_is_queued() -> None:
    # A BARRIER waiting for an instruction that can never start: the queued SYNC is the
    # lowest-numbered waiting instruction.
    b = builder()
    b.sync("EX", wait="ST")
    b.barrier()
    assert fault_of(b.build()) == (Fault.TOKEN_DEADLOCK, 1, 0)


# --------------------------------------------------------------------------------------------
# WATCHDOG
# --------------------------------------------------------------------------------------------

def test_watchdog_limit_is_exclusive_of_the_end() -> None:
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4)     # the program takes 34 cycles
    prog = b.build()
    assert run_reference(prog, watchdog=34).cycles == 34
    assert fault_of(prog, watchdog=33) == (Fault.WATCHDOG, 33, 0)
    assert fault_of(prog, watchdog=1) == (Fault.WATCHDOG, 1, 0)


def test_watchdog_from_the_config_and_before_a_deadlock() -> None:
    b = builder(watchdog_cycles=20)
    b.sync("LD")
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4)     # s 2, c 35: past the limit
    assert fault_of(b.build()) == (Fault.WATCHDOG, 20, 1)
    b = builder()
    b.sync("EX", wait="LD")            # would deadlock at 2
    assert fault_of(b.build(), watchdog=2) == (Fault.WATCHDOG, 2, 0)
    # Nothing pending at the limit: the index is the dispatcher's (a BARRIER dispatched at 2).
    b = builder()
    b.sync("LD")                       # s 1, r 2
    b.barrier()
    assert fault_of(b.build(), watchdog=2) == (Fault.WATCHDOG, 2, 1)
    assert run_reference(b.build(), watchdog=4).cycles == 4    # HALT dispatched at 3


# --------------------------------------------------------------------------------------------
# TOKEN_OVERFLOW
# --------------------------------------------------------------------------------------------

def test_token_overflow_at_the_retirement_that_exceeds_token_max() -> None:
    b = builder(token_max=2)
    for _ in range(3):
        b.sync("LD", signal="EX")      # k: s k+1, r k+2
    assert fault_of(b.build()) == (Fault.TOKEN_OVERFLOW, 4, 2)


def test_tokens_taken_make_room() -> None:
    b = builder(token_max=1)
    b.sync("LD", signal="EX")
    b.sync("EX", wait="LD")
    b.sync("LD", signal="EX")
    r = run_reference(b.build())
    assert list(r.trace.start[:3]) == [1, 2, 3]
    assert r.trace.engine[1] == Engine.EX


def test_first_engine_in_order_faults() -> None:
    # LD and VX both push their ST counter past token_max=2 at cycle 37; LD is taken first.
    b = builder(token_max=2)
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="VX")   # 0: s 1, r 34
    b.sync("VX", signal="ST", wait="LD")                  # 1: s 34, r 35
    b.sync("VX", signal="ST")                             # 2: s 35, r 36
    b.sync("VX", signal="ST")                             # 3: s 36, r 37 -> VX->ST = 3
    for _ in range(3):                                    # 4, 5, 6: s 5, 6, 7 but retire in
        b.sync("LD", signal="ST")                         # order after the LOAD: 35, 36, 37
    assert fault_of(b.build()) == (Fault.TOKEN_OVERFLOW, 37, 6)
