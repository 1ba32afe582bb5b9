"""VECTOR fp32 mode: ``npu.numerics.requantize(..., fp32=1)`` against an exact oracle written with
fractions (tests/f32_oracle.py): random and edge cases, ties, double rounding, |x| >= 2**24,
extreme and negative scales, exponent-0/255 patterns; and the integer mode is unchanged."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from f32_oracle import requantize_fp32, rne24, rne_int, scale_of

from npu import numerics

SPECIAL_BITS = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x807FFFFF,   # zero, subnormal
                0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF]   # inf, NaN


def _signed32(bits: int) -> int:
    bits &= 0xFFFFFFFF
    return bits - (1 << 32) if bits >> 31 else bits


def _check(acc, bias, bits, zp: int, lo: int, hi: int) -> int:
    """Compare numerics with the oracle lane by lane; returns how many lanes were checked."""
    acc = np.asarray(acc, dtype=np.int64)
    bias = np.asarray(bias, dtype=np.int64)
    mult = np.array([_signed32(int(b)) for b in np.asarray(bits).ravel()], dtype=np.int64)
    shift = np.full(len(mult), 7, dtype=np.int64)      # ignored in fp32 mode
    got = numerics.requantize(acc, bias, mult, shift, zp, lo, hi, fp32=1)
    assert got.dtype == np.int8
    for k in range(len(acc)):
        want = requantize_fp32(int(acc[k]), int(bias[k]), int(mult[k]), zp, lo, hi)
        assert int(got[k]) == want, (int(acc[k]), int(bias[k]), hex(int(mult[k]) & 0xFFFFFFFF),
                                     zp, lo, hi, int(got[k]), want)
    return len(acc)


def _bits(scales) -> np.ndarray:
    return np.asarray(scales, dtype=np.float32).view(np.int32).astype(np.int64)


def test_oracle_helpers_are_right() -> None:
    """The oracle's own building blocks on hand-worked values."""
    # -2.5 -2 -1.5 -1 -0.5 0 0.5 1 1.5 2 2.5
    assert [rne_int(Fraction(k, 2)) for k in range(-5, 6)] == [-2, -2, -2, -1, 0, 0, 0, 1, 2, 2,
                                                                 2]
    assert rne24(Fraction((1 << 24) + 1)) == 1 << 24          # tie, to the even mantissa
    assert rne24(Fraction((1 << 24) + 3)) == (1 << 24) + 4
    assert rne24(Fraction(-((1 << 25) + 2))) == -(1 << 25)
    assert rne24(Fraction(1, 3)) == Fraction(float(np.float32(1 / 3)))
    assert scale_of(0x3F800000) == 1 and scale_of(0xBE800000) == Fraction(-1, 4)
    assert scale_of(0x00800000) == Fraction(1, 2 ** 126)
    assert all(scale_of(b) == 0 for b in SPECIAL_BITS)


def test_random_lanes_in_the_useful_range() -> None:
    """Accumulators of every magnitude with scales that put the product near the int8 range,
    so the roundings decide the result."""
    rng = np.random.default_rng(11)
    n = 6000
    mag = np.exp2(rng.uniform(0, 31, n)).astype(np.int64)
    acc = np.clip(mag * rng.choice([-1, 1], n), -(1 << 31), (1 << 31) - 1)
    bias = rng.integers(-3000, 3001, n)
    bias[::5] = 0
    x = numerics.wrap_int32(acc + bias).astype(np.float64)
    target = rng.uniform(-300, 300, n)
    with np.errstate(divide="ignore"):
        scale = np.where(x != 0, target / x, 0.5)
    scale = np.where(np.abs(scale) < 2.0 ** -125, 2.0 ** -20, scale)
    scale[::7] = np.exp2(rng.integers(-30, -1, len(scale[::7])))     # powers of two: ties
    checked = 0
    for zp, lo, hi in ((0, -128, 127), (-7, -7, 127), (13, -100, 90), (5, 20, -20)):
        sel = slice(None, None, 4) if zp else slice(None)
        checked += _check(acc[sel], bias[sel], _bits(scale[sel]), zp, lo, hi)
    assert checked > 10000


def test_ties_round_to_even() -> None:
    halves = np.arange(-601, 602, 2)                       # x * 0.5 = k + 0.5
    _check(halves, np.zeros_like(halves), _bits(np.full(len(halves), 0.5)), 0, -128, 127)
    got = numerics.requantize(np.array([1, 3, 5, -1, -3, -5]), 0, _bits(0.5), 0, 0, -128, 127,
                              fp32=1)
    assert got.tolist() == [0, 2, 2, 0, -2, -2]


def test_double_rounding_differs_from_a_single_rounding() -> None:
    """Cases where rounding x (|x| >= 2**24) or the product to float32 first moves the result
    across a tie: the oracle and numerics agree, and both differ from exact rounding."""
    # x = 100.5 * 2**18 + 1 rounds to 100.5 * 2**18 in float32; times 2**-18 a tie -> 100.
    x = int(100.5 * 2 ** 18) + 1
    assert requantize_fp32(x, 0, int(_bits(2.0 ** -18)), 0, -128, 127) == 100
    assert rne_int(Fraction(x, 2 ** 18)) == 101
    _check([x, -x, x + 2, x - 2], [0] * 4, _bits([2.0 ** -18] * 4), 0, -128, 127)
    # Products just below k + 1/2 that round up to the tie in float32.
    rng = np.random.default_rng(5)
    found = 0
    accs, scales = [], []
    for _ in range(4000):
        xv = int(rng.integers(3, 1 << 23)) | 1
        k = int(rng.integers(-120, 120))
        s = np.float32((k + 0.5) / xv)
        for cand in (s, np.nextafter(s, np.float32(0)), np.nextafter(s, np.float32(np.inf))):
            exact = Fraction(xv) * scale_of(int(_bits(cand)))
            if rne_int(exact) != rne_int(rne24(exact)):
                found += 1
                accs.append(xv)
                scales.append(cand)
    assert found >= 20
    _check(accs, [0] * len(accs), _bits(scales), 0, -128, 127)


def test_large_accumulators_round_to_float32_first() -> None:
    base = [1 << 24, (1 << 24) + 1, (1 << 24) + 3, (1 << 31) - 1, -(1 << 31), (1 << 30) + 65,
            -(1 << 27) - 9]
    for s in (2.0 ** -17, 2.0 ** -18 * 1.5, 2.0 ** -24, -(2.0 ** -20) * 1.2345):
        _check(base, [0] * len(base), _bits([s] * len(base)), 0, -128, 127)
        _check(base, [-1] * len(base), _bits([s] * len(base)), 3, -128, 127)


def test_bias_wraps_before_the_conversion() -> None:
    acc = [(1 << 31) - 1, -(1 << 31), 1 << 30]
    bias = [1, -1, 1 << 30]
    _check(acc, bias, _bits([2.0 ** -24] * 3), 0, -128, 127)
    got = numerics.requantize(np.array(acc), np.array(bias), _bits([2.0 ** -24] * 3), 0, 0,
                              -128, 127, fp32=1)
    assert got.tolist() == [-128, 127, -128]


def test_extreme_and_negative_scales_saturate() -> None:
    acc = np.array([0, 1, -1, 1000, -(1 << 31), (1 << 31) - 1])
    for bits in (0x7F7FFFFF, 0xFF7FFFFF, 0x00800000, 0x80800000, 0x4B000000, 0x38000001):
        _check(acc, np.zeros_like(acc), np.full(len(acc), bits), 0, -128, 127)
        _check(acc, np.zeros_like(acc), np.full(len(acc), bits), -128, -128, 127)
    big = numerics.requantize(np.array([1, -1, 0]), 0, _bits(3e38), 0, 0, -128, 127, fp32=1)
    assert big.tolist() == [127, -128, 0]
    neg = numerics.requantize(np.array([10, -10]), 0, _bits(-0.5), 0, 0, -128, 127, fp32=1)
    assert neg.tolist() == [-5, 5]


def test_exponent_0_and_255_patterns_act_as_scale_0() -> None:
    acc = np.array([0, 5, -5, 1 << 20, -(1 << 31), (1 << 31) - 1] * len(SPECIAL_BITS))
    bits = np.repeat(SPECIAL_BITS, 6)
    for zp in (0, -9, 100):
        _check(acc, np.zeros_like(acc), bits, zp, -128, 127)
        got = numerics.requantize(acc, 0, np.array([_signed32(b) for b in bits]), 0, zp, -128,
                                  127, fp32=1)
        assert (got == zp).all()


def test_limit_and_clamps() -> None:
    lim = numerics.F32_PRODUCT_LIMIT
    acc = np.array([lim, lim + 1, -lim, -lim - 1, 4 * lim, -4 * lim])
    for zp, lo, hi in ((0, -128, 127), (-128, -128, 127), (127, -128, 127), (0, 10, -10)):
        _check(acc, np.zeros_like(acc), _bits([1.0] * len(acc)), zp, lo, hi)


def test_shift_row_ignored_and_integer_mode_unchanged() -> None:
    rng = np.random.default_rng(2)
    acc = rng.integers(-(1 << 20), 1 << 20, (5, 8))
    bias = rng.integers(-100, 100, 8)
    bits = _bits(rng.uniform(2.0 ** -16, 2.0 ** -8, 8))
    a = numerics.requantize(acc, bias, bits, rng.integers(0, 64, 8), 3, -128, 127, fp32=1)
    b = numerics.requantize(acc, bias, bits, rng.integers(0, 64, 8), 3, -128, 127, fp32=1)
    assert np.array_equal(a, b)
    mult = rng.integers(1 << 29, 1 << 31, 8)
    shift = rng.integers(20, 40, 8)
    fixed = numerics.requantize(acc, bias, mult, shift, 3, -128, 127)
    assert np.array_equal(fixed, numerics.requantize(acc, bias, mult, shift, 3, -128, 127,
                                                     fp32=0))


def test_f32_bits_round_trip() -> None:
    scales = np.float32([0.25, -1.5, 2.0 ** -20, 3.4e38])
    bits = numerics.f32_bits(scales)
    assert bits.dtype == np.int64
    assert [scale_of(int(b)) for b in bits] == [Fraction(float(s)) for s in scales]
    assert np.array_equal(numerics.f32_scales(bits), scales)
