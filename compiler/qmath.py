"""Quantization arithmetic: requantization multipliers and vector-unit step parameters.

onnxruntime (the reference) requantizes a QLinearConv/QGemm output as
``round_half_even(float32(acc) * float32(sx * sw / sy)) + zy`` with the scale computed in
float32. A float32 has a 24-bit mantissa, so :func:`npu.numerics.quantize_multiplier` (31-bit
multiplier) represents that float32 scale *exactly*, and the NPU's integer VECTOR reproduces
onnxruntime's result except where float32 rounding of the product itself crosses a tie.

ELTWISE has 16-bit multipliers (relative error about 2**-15): :func:`add_step` and
:func:`rescale_step` pick, among the multipliers nearest to the exact ratios, the ones that
reproduce onnxruntime's float32 QDQ arithmetic (``Q(DQ(a) + DQ(b))``) on every possible int8
input where such a choice exists (exhaustively checked: 65536 pairs, 256 values).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npu import numerics
from npu.compiler.errors import CompileError
from npu.compiler.ir import Quant, Step
from npu.numerics import INT8_MAX, INT8_MIN, quantize_multiplier

__all__ = ["requant_scales", "multipliers", "add_step", "rescale_step", "quantize_scalar",
           "ELT_MULT_MAX", "ELT_SHIFT_MAX"]

#: ELTWISE multiplier and shift ranges (16-bit signed, 6-bit unsigned fields of npu.isa).
ELT_MULT_MAX = (1 << 15) - 1
ELT_SHIFT_MAX = 63


def requant_scales(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """Per-channel ``x_scale * w_scale / y_scale`` in float32, in onnxruntime's order."""
    xs = np.float32(x_scale)
    ws = np.asarray(w_scale, dtype=np.float32)
    return (xs * ws) / np.float32(y_scale)


def multipliers(scales: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(mult, shift) int64 arrays with ``mult / 2**shift == scale`` for float32 scales."""
    mult = np.zeros(len(scales), dtype=np.int64)
    shift = np.zeros(len(scales), dtype=np.int64)
    for i, s in enumerate(np.asarray(scales, dtype=np.float64)):
        if s == 0.0:
            continue  # a channel of zero weights: output is the zero point
        try:
            mult[i], shift[i] = quantize_multiplier(float(s))
        except ValueError as exc:
            raise CompileError(f"{where}: requantization scale of channel {i}: {exc}") from None
    return mult, shift


def _shift_for(*ratios: float) -> int:
    """Largest shift <= 63 keeping round(r * 2**shift) within the 16-bit multiplier range."""
    top = max(abs(r) for r in ratios)
    if top == 0:
        return 0
    shift = ELT_SHIFT_MAX
    while shift > 0 and round(top * (1 << shift)) > ELT_MULT_MAX:
        shift -= 1
    if round(top * (1 << shift)) > ELT_MULT_MAX:
        raise CompileError(f"rescale ratio {top:.6g} is too large for ELTWISE (> {ELT_MULT_MAX})")
    return shift


_Q8 = np.arange(INT8_MIN, INT8_MAX + 1, dtype=np.int64)


def _dequantize(v: np.ndarray, q: Quant) -> np.ndarray:
    """onnxruntime's DequantizeLinear in float32: float(v - zp) * scale."""
    return (v - q.zero_point).astype(np.float32) * np.float32(q.scale)


def _quantize(x: np.ndarray, q: Quant) -> np.ndarray:
    """onnxruntime's QuantizeLinear in float32: round_half_even(x / scale) + zp, saturated."""
    return np.clip(np.rint(x / np.float32(q.scale)) + q.zero_point, INT8_MIN, INT8_MAX
                   ).astype(np.int64)


def _best(candidates: list[tuple[int, ...]], target: np.ndarray,
          run: Any) -> tuple[int, ...]:
    """The candidate whose integer result agrees with ``target`` on most inputs (first wins)."""
    best, score = candidates[0], -1
    for cand in candidates:
        got = int(np.count_nonzero(run(*cand) == target))
        if got > score:
            best, score = cand, got
            if got == target.size:
                break
    return best


def add_step(a: Quant, b: Quant, y: Quant, other: str, clamp_min: int = INT8_MIN,
             clamp_max: int = INT8_MAX) -> Step:
    """ELTWISE ADD parameters for ``y = Q(DQ(a) + DQ(b))``; ``other`` names operand b.

    The 16-bit multipliers are chosen among the nearest candidates to reproduce onnxruntime's
    float32 computation on as many of the 65536 input pairs as possible (often all)."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    rb = float(np.float32(b.scale) / np.float32(y.scale))
    va, vb = np.meshgrid(_Q8, _Q8, indexing="ij")
    target = np.clip(_quantize(_dequantize(va, a) + _dequantize(vb, b), y), clamp_min,
                     clamp_max).ravel()
    daf = (va - a.zero_point).ravel().astype(np.float32)
    dbf = (vb - b.zero_point).ravel().astype(np.float32)
    targetf = target.astype(np.float32)
    top = _shift_for(ra, rb)
    best, score = None, -1
    for shift in (top, top - 1):
        if shift < 0:
            continue
        ma0, mb0 = round(ra * (1 << shift)), round(rb * (1 << shift))
        cands = [(ma0 + i, mb0 + j) for i in (0, -1, 1, -2, 2) for j in (0, -1, 1, -2, 2)
                 if abs(ma0 + i) <= ELT_MULT_MAX and abs(mb0 + j) <= ELT_MULT_MAX]
        # |t| < 2**24: float32 holds every sum exactly, and scaling by 2**-shift then
        # rounding half to even is the integer round_shift (faster than int64 in numpy).
        ma = np.array([c[0] for c in cands], dtype=np.float32)
        mb = np.array([c[1] for c in cands], dtype=np.float32)
        t = daf[:, None] * ma[None, :] + dbf[:, None] * mb[None, :]
        got = np.clip(np.rint(t * np.float32(2.0 ** -shift)) + y.zero_point, clamp_min,
                      clamp_max)
        hits = (got == targetf[:, None]).sum(axis=0)
        k = int(np.argmax(hits))
        if int(hits[k]) > score:
            best, score = (int(ma[k]), int(mb[k]), shift), int(hits[k])
        if score == target.size:
            break
    ma_, mb_, shift_ = best
    return Step("add", a_zero=a.zero_point, a_mult=ma_, shift=shift_, zero_point=y.zero_point,
                clamp_min=clamp_min, clamp_max=clamp_max, other=other, b_zero=b.zero_point,
                b_mult=mb_)


def rescale_step(a: Quant, y: Quant, clamp_min: int = INT8_MIN,
                 clamp_max: int = INT8_MAX) -> Step:
    """ELTWISE ADD (b_mult 0) parameters for ``y = Q(DQ(a))`` with clamping, reproducing
    onnxruntime's float32 result on as many of the 256 inputs as possible."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    target = np.clip(_quantize(_dequantize(_Q8, a), y), clamp_min, clamp_max)

    def run(ma: int, shift: int) -> np.ndarray:
        return numerics.eltwise_add(_Q8, _Q8, a.zero_point, 0, ma, 0, shift, y.zero_point,
                                    clamp_min, clamp_max)

    top = _shift_for(ra)
    cands = [(round(ra * (1 << s)) + d, s) for s in (top, top - 1, top - 2) if s >= 0
             for d in (0, -1, 1, -2, 2, -3, 3) if abs(round(ra * (1 << s)) + d) <= ELT_MULT_MAX]
    ma, shift = _best(cands, target, run)
    return Step("rescale", a_zero=a.zero_point, a_mult=ma, shift=shift,
                zero_point=y.zero_point, clamp_min=clamp_min, clamp_max=clamp_max)


def quantize_scalar(x: float, q: Quant) -> int:
    """``QuantizeLinear`` of one float (round half to even, saturate to int8)."""
    v = np.round(np.float32(x) / np.float32(q.scale)) + q.zero_point
    return int(np.clip(v, INT8_MIN, INT8_MAX))


def is_identity(step: Step) -> bool:
    """A rescale that maps every int8 value to itself (same scale and zero point, no clamp)."""
    return (step.kind == "rescale" and step.a_zero == step.zero_point
            and step.a_mult == 1 << step.shift and step.clamp_min <= INT8_MIN
            and step.clamp_max >= INT8_MAX)
