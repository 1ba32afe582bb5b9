"""Integer semantics of the datapath, written once in numpy.

The reference interpreter executes these; the numba engine and the RTL are tested against them;
the compiler uses :func:`quantize_multiplier` to turn float scales into (multiplier, shift).
All functions accept numpy arrays (or scalars) and are exact in int64.
"""

from __future__ import annotations

import math

import numpy as np

INT8_MIN, INT8_MAX = -128, 127


def wrap_int32(x: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to int32 (the accumulator's arithmetic)."""
    return (np.asarray(x, dtype=np.int64).astype(np.int32)).astype(np.int64)


def round_shift(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``round(x / 2**shift)`` with ties to even, for int64 ``x`` and shift in [0, 63]."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64) & 63
    q = x >> s
    r = x - (q << s)  # in [0, 2**s)
    half = np.where(s > 0, np.int64(1) << np.maximum(s - 1, 0), np.int64(1) << 62)
    up = (s > 0) & ((r > half) | ((r == half) & ((q & 1) == 1)))
    return q + up.astype(np.int64)


def clamp(y: np.ndarray, lo: int | np.ndarray, hi: int | np.ndarray) -> np.ndarray:
    """``min(max(y, lo), hi)`` then saturate to int8 (if lo > hi the result is hi)."""
    y = np.minimum(np.maximum(np.asarray(y, dtype=np.int64), lo), hi)
    return np.clip(y, INT8_MIN, INT8_MAX)


#: |p| beyond which a float32 requantization product saturates whatever the zero point/clamp.
F32_PRODUCT_LIMIT = 1 << 15


def f32_scales(bits: np.ndarray) -> np.ndarray:
    """VECTOR fp32 mode: the float32 scales held (as int32 bit patterns) in a multiplier row.

    Bit patterns with exponent field 0 (zero, subnormal) or 255 (inf, NaN) act as scale 0, so
    every pattern has a defined, finite meaning (the compiler never emits them)."""
    u = np.asarray(bits, dtype=np.int64) & 0xFFFFFFFF
    exp = (u >> 23) & 0xFF
    u = np.where((exp == 0) | (exp == 0xFF), 0, u)
    return u.astype(np.uint32).view(np.float32)


def requantize(acc: np.ndarray, bias: np.ndarray, mult: np.ndarray, shift: np.ndarray,
               zero_point: int, clamp_min: int, clamp_max: int,
               fp32: int = 0) -> np.ndarray:
    """VECTOR: int32 accumulator rows -> int8, per lane (last axis) bias/multiplier/shift.

    ``x = wrap32(acc + bias)``, then

    * integer mode (``fp32 == 0``): ``y = clamp(round_shift(x * mult, shift & 63) + zero_point)``;
    * fp32 mode: ``mult`` holds binary32 scales (:func:`f32_scales`) and
      ``y = clamp(rne(f32(f32(x) * scale)) + zero_point)``: ``x`` is rounded to float32, the
      product is rounded to float32 (both to nearest even), and that is rounded to the nearest
      integer, ties to even. This is onnxruntime's (MLAS) requantization of QLinearConv, QGemm
      and QLinearGlobalAveragePool, bit for bit; its double rounding cannot be reproduced by a
      fixed-point multiplier. Products beyond +-2**15 saturate (any clamp would anyway).
    """
    x = wrap_int32(np.asarray(acc, dtype=np.int64) + np.asarray(bias, dtype=np.int64))
    if fp32:
        with np.errstate(over="ignore"):                      # +-inf: clipped next
            p = x.astype(np.float32) * f32_scales(mult)       # IEEE binary32, round to even
        p = np.clip(p, -F32_PRODUCT_LIMIT, F32_PRODUCT_LIMIT)
        y = np.rint(p).astype(np.int64)                       # np.rint: ties to even
        return clamp(y + zero_point, clamp_min, clamp_max).astype(np.int8)
    prod = x * np.asarray(mult, dtype=np.int64)
    return clamp(round_shift(prod, shift) + zero_point, clamp_min, clamp_max).astype(np.int8)


def f32_bits(scale: float | np.ndarray) -> np.ndarray:
    """int32 bit patterns of float32 scales (what a VECTOR fp32 multiplier row holds)."""
    return np.asarray(scale, dtype=np.float32).view(np.int32).astype(np.int64)


def eltwise_add(a: np.ndarray, b: np.ndarray, a_zero: int, b_zero: int, a_mult: int,
                b_mult: int, shift: int, zero_point: int, clamp_min: int,
                clamp_max: int) -> np.ndarray:
    """ELTWISE ADD: ``clamp(round_shift((a-za)*ma + (b-zb)*mb, shift) + zp)`` in int8."""
    t = ((np.asarray(a, dtype=np.int64) - a_zero) * a_mult
         + (np.asarray(b, dtype=np.int64) - b_zero) * b_mult)
    return clamp(round_shift(t, shift) + zero_point, clamp_min, clamp_max).astype(np.int8)


def eltwise_max(a: np.ndarray, b: np.ndarray, clamp_min: int, clamp_max: int) -> np.ndarray:
    """ELTWISE MAX: ``clamp(max(a, b))`` in int8."""
    return clamp(np.maximum(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)),
                 clamp_min, clamp_max).astype(np.int8)


def matmul(inputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """MATMUL: int8 (M, rows) @ int8 (rows, cols) -> int32 (M, cols), exact."""
    return wrap_int32(np.asarray(inputs, dtype=np.int64) @ np.asarray(weights, dtype=np.int64))


def quantize_multiplier(real: float, max_shift: int = 62) -> tuple[int, int]:
    """Return ``(mult, shift)`` with ``mult / 2**shift ~= real``, mult in [2**30, 2**31).

    ``real`` must be positive and finite. Very small values get the largest shift and a smaller
    multiplier; values >= 2**31 cannot be represented and raise ValueError.
    """
    if not math.isfinite(real) or real <= 0:
        raise ValueError(f"requantization scale must be positive and finite, got {real!r}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2**exponent, mantissa in [.5, 1)
    mult = round(mantissa * (1 << 31))
    shift = 31 - exponent
    if mult == 1 << 31:
        mult //= 2
        shift -= 1
    if shift < 0:
        raise ValueError(f"requantization scale {real!r} is too large (>= 2**31)")
    while shift > max_shift:
        mult = (mult + 1) >> 1
        shift -= 1
    return int(mult), int(shift)
