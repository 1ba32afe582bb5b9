"""The numba engine: each jitted kernel against its numpy twin, the bulk static-fault check
against the scalar ISA functions, faults, progress, bad arguments and a GEMM against numpy.

Whole-program agreement with the reference interpreter is in test_differential.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import any_instr, valid_instr

from npu import numerics
from npu.builder import ProgramBuilder
from npu.isa import (
    ALL_FIELD_NAMES,
    INSTR_WORDS,
    PRESETS,
    Fault,
    ISAError,
    Opcode,
    address_error,
    decode,
    encode_words,
    field_arrays,
    static_faults,
)
from npu.program import ProgramError
from npu.runtime import NPUFault, run
from npu.runtime import _kernels as K
from npu.runtime import reference as ref
from npu.runtime.engine import execute, prepare
from npu.runtime.io import initial_state
from npu.runtime.reference import run_reference

PROPS = settings(max_examples=120, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIGS = [PRESETS["npu4"], PRESETS["npu8"]]
DRAM = 4096


def _row(ins) -> np.ndarray:
    """The instruction's row of the engine's field matrix."""
    fa = field_arrays(encode_words([ins]))
    return np.array([fa[k][0] for k in ALL_FIELD_NAMES], dtype=np.int64)


def _memories(cfg, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dram = rng.integers(0, 256, DRAM, dtype=np.uint8)
    spad = rng.integers(-128, 128, (cfg.spad_rows, cfg.cols), dtype=np.int8)
    acc = rng.integers(-(1 << 31), 1 << 31, (cfg.acc_rows, cfg.cols), dtype=np.int64)
    acc = acc.astype(np.int32)
    # Small VECTOR parameters in some rows, so requantization is not always saturated.
    acc[1::7, :] = rng.integers(0, 1 << 16, (len(acc[1::7]), cfg.cols))
    acc[2::7, :] = rng.integers(0, 40, (len(acc[2::7]), cfg.cols))
    # ... and float32 scales (for fp32=1) after small biases in others.
    acc[4::7, :] = rng.integers(-2000, 2001, (len(acc[4::7]), cfg.cols))
    acc[5::7, :] = rng.uniform(2.0 ** -20, 2.0 ** -2, (len(acc[5::7]), cfg.cols)).astype(
        np.float32).view(np.int32)
    return dram, spad, acc


def test_isa_fingerprint_is_current() -> None:
    """The ISA constants compiled into the cached kernels match npu.isa (else the kernels run
    uncached; update ISA_FINGERPRINT in runtime/_kernels.py after reviewing them)."""
    assert K.isa_fingerprint() == K.ISA_FINGERPRINT
    assert K.NJIT["cache"] is True and K.NJIT["fastmath"] is False


# --------------------------------------------------------------------------------------------
# Scalar helpers against npu.numerics
# --------------------------------------------------------------------------------------------

EDGE = [0, 1, -1, 2, -2, 3, 5, 7, 8, -8, 127, -128, (1 << 31) - 1, -(1 << 31), 1 << 31,
        (1 << 62) + 12345, -(1 << 62) - 7, (1 << 63) - 1, -(1 << 63)]


def test_wrap_round_clamp_match_numerics() -> None:
    rng = np.random.default_rng(0)
    xs = EDGE + rng.integers(-(1 << 62), 1 << 62, 300).tolist()
    for x in xs:
        assert K.wrap32(x) == numerics.wrap_int32(np.int64(x))
        for s in (0, 1, 2, 3, 17, 31, 32, 62, 63, 64, 65, -1):
            assert K.round_shift(x, s) == numerics.round_shift(np.int64(x), np.int64(s)), (x, s)
        for lo, hi in ((-128, 127), (0, 6), (10, -5), (-3, -3)):
            assert K.clamp8(x, lo, hi) == numerics.clamp(np.int64(x), lo, hi)


# --------------------------------------------------------------------------------------------
# Each datapath kernel against the reference interpreter's numpy function
# --------------------------------------------------------------------------------------------

@PROPS
@given(data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_datapath_kernels_match_numpy_twins(data: st.DataObject, seed: int) -> None:
    cfg = data.draw(st.sampled_from(CONFIGS))
    ins = data.draw(valid_instr(cfg, DRAM))
    op = ins.opcode
    f = ins.fields
    mine = _memories(cfg, seed)
    if op == Opcode.GATHER and data.draw(st.booleans()):
        # Mostly-valid indices (the random bytes are almost always out of range).
        idx = data.draw(st.lists(st.integers(-2, 40), min_size=f["n"], max_size=f["n"]))
        raw = np.array(idx, dtype="<i4").view(np.uint8)
        mine[0][f["index_addr"]:f["index_addr"] + raw.size] = raw
    twin = tuple(m.copy() for m in mine)
    dram, spad, acc = mine
    tdram, tspad, tacc = twin
    row = _row(ins)
    bank = data.draw(st.integers(0, 1))
    wbank = np.random.default_rng(seed + 1).integers(-128, 128, (2, cfg.rows, cfg.cols),
                                                     dtype=np.int8)
    wbank_f = wbank.astype(np.float32)
    twin_w = wbank.copy()
    if op == Opcode.LOAD:
        K.exec_load(row, dram, spad, acc)
        ref._exec_load(f, tdram, tspad, tacc)
    elif op == Opcode.STORE:
        K.exec_store(row, dram, spad, acc)
        ref._exec_store(f, tdram, tspad, tacc)
    elif op == Opcode.GATHER:
        ok = K.gather_ok(row, dram)
        if ok:
            K.exec_gather(row, dram, spad, acc)
        try:
            ref._exec_gather(f, tdram, tspad, tacc, 0, 0)
            assert ok
        except NPUFault:
            assert not ok
    elif op == Opcode.PRELOAD:
        K.exec_preload(row, spad, wbank, wbank_f, bank)
        twin_w[bank] = tspad[f["spad_addr"]:f["spad_addr"] + cfg.rows]
    elif op == Opcode.MATMUL:
        xbuf = np.zeros((cfg.acc_rows, cfg.rows), np.float32)
        ybuf = np.zeros((cfg.acc_rows, cfg.cols), np.float32)
        K.exec_matmul(row, spad, acc, wbank, wbank_f, bank, xbuf, ybuf)
        ref._exec_matmul(f, tspad, tacc, twin_w[bank])
    elif op == Opcode.VECTOR:
        K.exec_vector(row, spad, acc)
        ref._exec_vector(f, tspad, tacc)
    elif op == Opcode.ELTWISE:
        K.exec_eltwise(row, spad)
        ref._exec_eltwise(f, tspad)
    for a, b in zip((dram, spad, acc, wbank), (tdram, tspad, tacc, twin_w)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(wbank_f, wbank.astype(np.float32))


def test_matmul_kernel_int_path_for_wide_arrays() -> None:
    """Arrays taller than FLOAT32_EXACT_ROWS use exact int64 dot products (with wrapping)."""
    cfg = dataclasses.replace(PRESETS["npu4"], rows=2048, cols=2048, spad_rows=8, acc_rows=4)
    rng = np.random.default_rng(3)
    spad = np.full((8, 2048), -128, dtype=np.int8)
    spad[1] = rng.integers(-128, 128, 2048)
    w = np.full((2, 2048, 2048), -128, dtype=np.int8)
    acc = rng.integers((1 << 31) - (1 << 26), 1 << 31, (4, 2048)).astype(np.int32)
    want = acc.copy()
    exact = acc[1:3].astype(np.int64) + spad[0:2].astype(np.int64) @ w[1].astype(np.int64)
    b = ProgramBuilder(cfg)
    b.matmul(spad_addr=0, spad_stride_inner=1, acc_addr=1, n_inner=2, accumulate=1)
    row = _row(b.instructions[0])
    K.exec_matmul(row, spad, acc, w, w.astype(np.float32), 1, np.zeros((4, 2048), np.float32),
                  np.zeros((4, 2048), np.float32))
    ref._exec_matmul(b.instructions[0].fields, spad, want, w[1])
    np.testing.assert_array_equal(acc, want)
    assert cfg.rows > K.FLOAT32_EXACT_ROWS and (exact > (1 << 31) - 1).any()  # really wraps


# --------------------------------------------------------------------------------------------
# Bulk static faults (npu.isa.static_faults) against decode/address_error one by one
# --------------------------------------------------------------------------------------------

def _scalar_faults(words: np.ndarray, cfg, dram_bytes: int) -> np.ndarray:
    out = []
    for row in words:
        try:
            ins = decode(row.astype("<u8").tobytes())
        except ISAError:
            out.append(int(Fault.ILLEGAL_INSTRUCTION))
            continue
        out.append(int(Fault.ADDRESS_OUT_OF_RANGE) if address_error(ins, cfg, dram_bytes)
                   else 0)
    return np.array(out, dtype=np.int64)


@PROPS
@given(data=st.data())
def test_static_faults_equal_scalar_checks(data: st.DataObject) -> None:
    cfg = data.draw(st.sampled_from(CONFIGS))
    dram_bytes = data.draw(st.integers(1, 8192))
    instrs = data.draw(st.lists(valid_instr(cfg, DRAM) | any_instr(), min_size=1, max_size=20))
    words = encode_words(instrs)
    # Corrupt some words: random bits anywhere (reserved bits, illegal opcodes, own-engine
    # token masks), or a whole random word.
    for k in range(len(words)):
        kind = data.draw(st.integers(0, 4))
        if kind == 1:
            bit = data.draw(st.integers(0, 255))
            words[k, bit // 64] ^= np.uint64(1 << (bit % 64))
        elif kind == 2:
            words[k] = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=4,
                                                   max_size=4)), dtype=np.uint64)
    got = static_faults(words, cfg, dram_bytes)
    np.testing.assert_array_equal(got, _scalar_faults(words, cfg, dram_bytes))


def test_static_faults_eltwise_overlap_rule() -> None:
    cfg = PRESETS["npu4"]
    b = ProgramBuilder(cfg, dram_bytes=64)
    b.eltwise(a_addr=8, b_addr=40, dst=8, n_inner=4, func=1)    # in place on A: legal
    b.eltwise(a_addr=8, b_addr=40, dst=9, n_inner=4, func=1)    # shifted by one row: illegal
    b.eltwise(a_addr=8, b_addr=40, dst=20, n_inner=4, func=1)   # disjoint: legal
    b.eltwise(a_addr=8, b_addr=40, dst=8, n_inner=4, a_stride_inner=2, func=1)  # illegal
    words = encode_words(b.instructions)
    assert static_faults(words, cfg, 64).tolist() == [0, 2, 0, 2]


# --------------------------------------------------------------------------------------------
# Programs: results, faults (same code, cycle, index as the reference), progress, arguments
# --------------------------------------------------------------------------------------------

def _both(program, inputs=None, **kw):
    """Run both executors; return both results, or both faults' keys."""
    out = []
    for runner in (run, run_reference):
        try:
            out.append(runner(program, inputs, **kw))
        except NPUFault as exc:
            out.append(exc.key())
    return out


def _assert_same(a, b) -> None:
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
        return
    assert a.cycles == b.cycles
    assert a.trace.equal(b.trace)
    for k in ("dram", "spad", "acc"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def _small_gemm(cfg_name: str = "npu4"):
    """A two-tile GEMM with bias-free requantization, built by hand with the builder."""
    b = ProgramBuilder(cfg_name)
    d = b.config.rows
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (8, d), dtype=np.int8)
    w = rng.integers(-128, 128, (d, d), dtype=np.int8)
    a_in = b.input("a", a.shape, "int8")
    w_addr = b.segment("w", w)
    out = b.output("y", (8, d), "int32")
    sa, sw, ac = b.alloc_spad(8), b.alloc_spad(d), b.alloc_acc(8)
    b.load(dram_addr=a_in.addr, dram_stride_inner=d, dst=sa, n_inner=8, row_bytes=d)
    b.load(dram_addr=w_addr, dram_stride_inner=d, dst=sw, n_inner=d, row_bytes=d, signal="EX")
    b.preload(sw, wait="LD")
    b.matmul(spad_addr=sa, acc_addr=ac, n_inner=8, swap=1, signal="ST")
    b.store(src=ac, mem=1, n_inner=8, row_bytes=4 * d, dram_addr=out.addr,
            dram_stride_inner=4 * d, wait="EX")
    return b, {"a": a}, a.astype(np.int64) @ w.astype(np.int64)


def test_small_gemm_matches_numpy_and_reference() -> None:
    b, inputs, want = _small_gemm()
    prog = b.build()
    res, res_ref = _both(prog, inputs)
    np.testing.assert_array_equal(res.outputs()["y"], want)
    _assert_same(res, res_ref)
    assert res.extra["executor"] == "numba"
    assert (res.trace.engine[:5] == [0, 0, 1, 1, 3]).all() and res.trace.engine[5] == -1


def test_gemm_example_matches_numpy() -> None:
    gemm = _import_gemm()
    prog, inputs, expected = gemm.build_gemm("npu16", 64, 48, 80, seed=5)
    res = run(prog, inputs)
    (name,) = [b.name for b in prog.outputs]
    np.testing.assert_array_equal(res.outputs()[name], expected)
    _assert_same(res, run_reference(prog, inputs))


def _import_gemm():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "gemm.py"
    if not path.exists():
        pytest.skip("examples/gemm.py is not there yet")
    spec = importlib.util.spec_from_file_location("_gemm_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fault_of(program, **kw) -> tuple[int, int, int]:
    with pytest.raises(NPUFault) as numba_exc:
        run(program, **kw)
    with pytest.raises(NPUFault) as ref_exc:
        run_reference(program, **kw)
    assert numba_exc.value.key() == ref_exc.value.key()
    assert numba_exc.value.detail
    return numba_exc.value.key()


def test_fault_illegal_and_address_at_dispatch() -> None:
    cfg = PRESETS["npu4"]
    b = ProgramBuilder(cfg, dram_bytes=256)
    b.load(dram_addr=0, dram_stride_inner=4, dst=0, n_inner=4, row_bytes=4)
    b.load(dram_addr=250, dst=0, n_inner=4, dram_stride_inner=4, row_bytes=4)  # past DRAM
    b.halt()
    prog = b.build(validate=False)
    with pytest.raises(ProgramError, match="instruction 1"):
        run(prog)
    assert _fault_of(prog, validate=False) == (int(Fault.ADDRESS_OUT_OF_RANGE), 1, 1)
    words = prog.instructions.copy()
    words[1, INSTR_WORDS - 1] |= np.uint64(1 << 63)  # a reserved bit
    bad = dataclasses.replace(prog, instructions=words)
    assert _fault_of(bad, validate=False) == (int(Fault.ILLEGAL_INSTRUCTION), 1, 1)
    words[1] = 0  # opcode 0
    assert _fault_of(bad, validate=False) == (int(Fault.ILLEGAL_INSTRUCTION), 1, 1)


def test_fault_past_the_end_and_empty_program() -> None:
    b = ProgramBuilder("npu4", dram_bytes=64)
    b.sync("LD")
    prog = b.build(validate=False)
    nohalt = dataclasses.replace(prog, instructions=prog.instructions[:1])
    assert _fault_of(nohalt) == (int(Fault.ILLEGAL_INSTRUCTION), 1, 1)
    empty = dataclasses.replace(prog, instructions=prog.instructions[:0])
    assert _fault_of(empty) == (int(Fault.ILLEGAL_INSTRUCTION), 0, 0)


def test_fault_deadlock_and_watchdog() -> None:
    b = ProgramBuilder("npu4", dram_bytes=64)
    b.sync("LD")
    b.sync("EX", wait="VX")      # nobody ever signals EX from VX
    b.sync("LD")
    b.halt()
    prog = b.build()
    code, cycle, index = _fault_of(prog)
    assert (code, index) == (int(Fault.TOKEN_DEADLOCK), 1)
    assert cycle > 3
    b2, inputs, _ = _small_gemm()
    gemm = b2.build()
    cycles = run(gemm, inputs).cycles
    for limit in (1, 5, cycles - 1):
        key = _fault_of(gemm, inputs=inputs, watchdog=limit)
        assert key[:2] == (int(Fault.WATCHDOG), limit)
    assert run(gemm, inputs, watchdog=cycles).cycles == cycles


def test_fault_token_overflow() -> None:
    cfg = dataclasses.replace(PRESETS["npu4"], name="tok2", token_max=2)
    b = ProgramBuilder(cfg, dram_bytes=64)
    for _ in range(4):
        b.sync("LD", signal="EX")
    b.halt()
    assert _fault_of(b.build()) == (int(Fault.TOKEN_OVERFLOW), 4, 2)


def test_fault_gather_index_out_of_dram() -> None:
    b = ProgramBuilder("npu4", dram_bytes=128)
    idx = b.segment("idx", np.array([0, 3, 40, 2], dtype="<i4"))   # row 40 lies past DRAM
    b.gather(dram_addr=0, index_addr=idx, row_stride=4, dst=0, n=4, row_bytes=4)
    b.halt()
    assert _fault_of(b.build()) == (int(Fault.ADDRESS_OUT_OF_RANGE), 1, 0)


def test_progress_bar_resumes_exactly() -> None:
    """progress=True runs the kernel in many small chunks; the result must not change."""
    b = ProgramBuilder("npu4", dram_bytes=4096)
    rng = np.random.default_rng(0)
    b.segment("x", rng.integers(0, 256, 4096 - 64, dtype=np.uint8))
    for k in range(300):
        b.load(dram_addr=8 * k, dram_stride_inner=4, dst=k % 64, n_inner=3, row_bytes=4,
               signal="ST")
        b.store(src=k % 64, mem=0, n_inner=3, row_bytes=4, dram_addr=3072 + 4 * (k % 64),
                dram_stride_inner=4, wait="LD")
    prog = b.build()
    plain = run(prog)
    shown = run(prog, progress=True)
    _assert_same(plain, shown)
    _assert_same(plain, run_reference(prog))


def test_bad_arguments() -> None:
    b, inputs, _ = _small_gemm()
    prog = b.build()
    with pytest.raises(ValueError, match="engine"):
        run(prog, inputs, engine="fast")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="watchdog"):
            run(prog, inputs, watchdog=bad)
    with pytest.raises(ValueError, match="input"):
        run(prog, {"nope": np.zeros(3)})
    prep = prepare(prog)
    dram, spad, acc = initial_state(prog, inputs)
    with pytest.raises(ValueError, match="spad"):
        execute(prep, dram, spad[:-1], acc)
    with pytest.raises(ValueError, match="dram"):
        execute(prep, dram.astype(np.int8), spad, acc)


def test_reference_engine_is_selectable() -> None:
    b, inputs, want = _small_gemm()
    res = run(b.build(), inputs, engine="reference")
    np.testing.assert_array_equal(res.outputs()["y"], want)
    assert res.extra.get("executor") == "reference"
