"""VECTOR with ``fp32=1`` on the numba engine: the kernel against its numpy twin and the exact
oracle (tests/f32_oracle.py) on hard cases, whole programs against the reference interpreter,
and random programs with many fp32 VECTORs against the reference interpreter."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from f32_oracle import requantize_fp32, rne24, rne_int, scale_of
from test_differential import mismatch

from npu.builder import ProgramBuilder
from npu.isa import ALL_FIELD_NAMES, PRESETS, Instr, Opcode, encode_words, field_arrays
from npu.numerics import f32_bits
from npu.randprog import f32_scale_bits, random_inputs, random_program
from npu.runtime import _kernels as K
from npu.runtime import reference as ref
from npu.runtime import run
from npu.runtime.reference import run_reference

SPECIAL = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
           0xFFFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x80800000]


def _signed(bits) -> np.ndarray:
    return (np.asarray(bits, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _hard_lanes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, scale bits) pairs where one of the two float32 roundings moves the result across a
    tie (so a single rounding, or float64 arithmetic, gets them wrong)."""
    xs, bits = [], []
    while len(xs) < n:
        if rng.random() < 0.3:       # |x| >= 2**24 rounds to float32 onto a tie
            k = int(rng.integers(-120, 120))
            e = int(rng.integers(18, 24))
            x = int((k + 0.5) * 2 ** e) + int(rng.choice([-1, 1]))
            s = np.float32(2.0 ** -e)
        else:                        # the product rounds to float32 onto a tie
            x = int(rng.integers(3, 1 << 23)) | 1
            s = np.float32((int(rng.integers(-120, 120)) + 0.5) / x)
            s = [s, np.nextafter(s, np.float32(0)), np.nextafter(s, np.float32(np.inf))][
                int(rng.integers(0, 3))]
        exact = Fraction(x) * scale_of(int(f32_bits(s)))
        if rne_int(exact) != rne_int(rne24(rne24(Fraction(x)) * scale_of(int(f32_bits(s))))):
            xs.append(x)
            bits.append(int(f32_bits(s)))
    return np.array(xs, dtype=np.int64), np.array(bits, dtype=np.int64)


@pytest.mark.parametrize("cfg", [PRESETS["npu4"], PRESETS["npu16"]], ids=lambda c: c.name)
def test_kernel_matches_twin_and_oracle(cfg) -> None:
    """exec_vector (fp32) == reference._exec_vector == the exact oracle, lane by lane, on
    random, hard (double rounding), special-pattern and saturating lanes."""
    rng = np.random.default_rng(7)
    cols = cfg.cols
    for trial in range(30):
        acc = rng.integers(-(1 << 31), 1 << 31, (cfg.acc_rows, cols)).astype(np.int32)
        n = int(rng.integers(1, 9))
        x, hard = _hard_lanes(rng, n * cols)
        acc[0:n] = x.reshape(n, cols).astype(np.int32)
        p = 20
        acc[p] = 0 if trial % 2 else rng.integers(-3000, 3000, cols)
        mult = f32_scale_bits(rng, cols, special=0.2)
        if trial % 3 == 0:
            mult = hard[:cols]                     # the hard lanes keep their scales
        if trial % 5 == 4:
            mult = np.array([SPECIAL[(trial + k) % len(SPECIAL)] for k in range(cols)])
        acc[p + 1] = _signed(mult)
        acc[p + 2] = rng.integers(-(1 << 31), 1 << 31, cols)       # ignored
        zp = int(rng.integers(-128, 128)) if trial % 4 else 0
        lo, hi = (-128, 127) if trial % 3 else (int(rng.integers(-128, 128)),
                                                  int(rng.integers(-128, 128)))
        ins = Instr(Opcode.VECTOR, 0, 0, dict(acc_addr=0, spad_addr=5, param_addr=p, n=n,
                                               zero_point=zp, clamp_min=lo, clamp_max=hi,
                                               fp32=1))
        fa = field_arrays(encode_words([ins]))
        row = np.array([fa[k][0] for k in ALL_FIELD_NAMES], dtype=np.int64)
        spad = rng.integers(-128, 128, (cfg.spad_rows, cols)).astype(np.int8)
        tspad, tacc = spad.copy(), acc.copy()
        K.exec_vector(row, spad, acc)
        ref._exec_vector(ins.fields, tspad, tacc)
        np.testing.assert_array_equal(spad, tspad)
        np.testing.assert_array_equal(acc, tacc)
        for i in range(n):
            for j in range(cols):
                want = requantize_fp32(int(acc[i, j]), int(acc[p, j]), int(acc[p + 1, j]), zp,
                                       lo, hi)
                assert spad[5 + i, j] == want, (trial, i, j)
        if trial % 3 == 0 and trial % 5 != 4 and not trial % 2 and zp == 0 and lo == -128:
            # The hard lanes with bias 0: the result is not the single-rounded one.
            single = [rne_int(Fraction(int(acc[i, j])) * scale_of(int(acc[p + 1, j])))
                      for i in range(n) for j in range(cols)]
            got = spad[5:5 + n].ravel().astype(int).tolist()
            assert any(g != max(-128, min(127, s)) for g, s in zip(got, single))


def test_program_engine_reference_and_oracle_agree() -> None:
    """A program: LOAD accumulators and fp32 parameters into ACC, two VECTORs (fp32 and
    integer) over the same accumulators, STORE; both executors give the oracle's bytes."""
    cfg = PRESETS["npu8"]
    rng = np.random.default_rng(3)
    cols, n = cfg.cols, 12
    x, hard = _hard_lanes(rng, n * cols)
    accs = x.reshape(n, cols).astype("<i4")
    accs[0, :3] = [(1 << 31) - 1, -(1 << 31), 0]
    bias = rng.integers(-50, 50, cols).astype("<i4")
    bias[:4] = 0
    scales = _signed(np.concatenate([hard[:cols - 3], SPECIAL[:3]]))
    params = np.stack([bias, scales, rng.integers(0, 64, cols)]).astype("<i4")
    int_params = np.stack([bias, rng.integers(1 << 29, 1 << 31, cols),
                           rng.integers(30, 40, cols)]).astype("<i4")
    b = ProgramBuilder(cfg)
    row = cfg.acc_row_bytes
    base = b.segment("acc", np.concatenate([accs, params, int_params]).view(np.uint8).ravel())
    out = b.alloc_dram(2 * n * cols)
    b.output("y", (2 * n, cols), "int8", addr=out)
    b.load(dram_addr=base, dram_stride_inner=row, dst=0, n_inner=n + 6, row_bytes=row, mem=1,
           signal="VX")
    b.vector(acc_addr=0, spad_addr=0, param_addr=n, n=n, zero_point=3, fp32=1, wait="LD")
    b.vector(acc_addr=0, spad_addr=n, param_addr=n + 3, n=n, zero_point=-2, signal="ST")
    b.store(dram_addr=out, src=0, n_inner=2 * n, row_bytes=cols, dram_stride_inner=cols,
            wait="VX")
    b.halt()
    prog = b.build()
    assert mismatch(prog, {}) is None
    got = run(prog).outputs()["y"]
    np.testing.assert_array_equal(got, run_reference(prog).outputs()["y"])
    for i in range(n):
        for j in range(cols):
            want = requantize_fp32(int(accs[i, j]), int(bias[j]), int(scales[j]), 3, -128, 127)
            assert got[i, j] == want, (i, j)


def test_random_programs_with_fp32_vectors_agree() -> None:
    """Random programs of VECTORs fed by LOAD/MATMUL (many fp32): numba == reference."""
    bad, fp32 = [], 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        cfg = ("npu4", "npu8")[seed % 2]
        prog = random_program(rng, cfg, int(rng.integers(20, 60)),
                              kinds=["LOAD", "PRELOAD", "MATMUL", "VECTOR", "STORE"])
        fp32 += sum(ins.opcode == Opcode.VECTOR and ins.fields["fp32"] == 1
                    for ins in prog.decoded())
        why = mismatch(prog, random_inputs(rng, prog))
        if why:
            bad.append(f"seed {seed} {cfg}: {why}")
    assert not bad, bad
    assert fp32 >= 40
