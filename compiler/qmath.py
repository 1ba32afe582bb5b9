"""Quantization arithmetic: requantization parameters and vector-unit step parameters.

The reference is onnxruntime's CPU int8 kernels (what a QDQ model runs on once onnxruntime
fuses it: QLinearConv, QGemm, QLinearMatMul, QLinearGlobalAveragePool, QLinearAveragePool,
QLinearConcat, QLinearAdd; plain float ops for the QDQ patterns it does not fuse):

* an int32 accumulator (conv, gemm, matmul, pooling sums) is requantized as
  ``round_half_even(float32(float32(acc) * scale)) + zy`` with ``scale`` a float32 computed in
  onnxruntime's order (:func:`requant_scales`, :func:`pool_scale`). That double rounding is not
  a fixed-point multiply, so VECTOR runs in its ``fp32`` mode with the float32 bit patterns in
  the multiplier row (:func:`requant_params`): bit for bit onnxruntime's result.
* ELTWISE ADD has integer multipliers and a shared shift (``npu.isa``):
  :func:`add_step` and :func:`rescale_step` pick, among the multipliers nearest to the exact
  ratios, the ones that reproduce onnxruntime's arithmetic (QLinearAdd, the float32 add of an
  unfused ``Sum``, QLinearConcat's table) on every possible int8 input where such a choice
  exists (exhaustively checked: 65536 pairs, 256 values).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npu import numerics
from npu.compiler.errors import CompileError
from npu.compiler.ir import Quant, Step
from npu.isa import LAYOUTS, Opcode
from npu.numerics import INT8_MAX, INT8_MIN

__all__ = ["requant_scales", "pool_scale", "requant_params", "add_step",
           "qlinear_add", "rescale_step", "quantize_scalar", "ELT_MULT_MAX", "ELT_SHIFT_MAX"]

#: ELTWISE multiplier and shift ranges, from the fields of npu.isa (multipliers are unsigned:
#: 0 <= a_mult, b_mult <= ELT_MULT_MAX; shift <= ELT_SHIFT_MAX).
ELT_MULT_MAX = LAYOUTS[Opcode.ELTWISE]["a_mult"].hi
ELT_SHIFT_MAX = LAYOUTS[Opcode.ELTWISE]["shift"].hi


def requant_scales(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """Per-channel ``x_scale * w_scale / y_scale`` in float32, in onnxruntime's order."""
    xs = np.float32(x_scale)
    ws = np.asarray(w_scale, dtype=np.float32)
    return (xs * ws) / np.float32(y_scale)


def pool_scale(x_scale: float, y_scale: float, count: int) -> np.float32:
    """Average-pool requantization scale ``x_scale / (y_scale * count)`` in float32, as
    onnxruntime's QLinearGlobalAveragePool / QLinearAveragePool compute it."""
    return np.float32(x_scale) / (np.float32(y_scale) * np.float32(count))


def requant_params(scales: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """VECTOR fp32-mode (multiplier, shift) rows: float32 bit patterns and zeros.

    :func:`npu.numerics.requantize` with ``fp32=1`` then computes onnxruntime's
    ``rne(f32(f32(acc) * scale))`` exactly."""
    s = np.asarray(scales, dtype=np.float32).reshape(-1)
    bad = ~np.isfinite(s) | (s < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CompileError(f"{where}: requantization scale of channel {i} is {s[i]} "
                           "(must be finite and >= 0)")
    return numerics.f32_bits(s), np.zeros(s.size, dtype=np.int64)


def _shift_for(*ratios: float) -> int:
    """Largest shift <= ELT_SHIFT_MAX keeping round(r * 2**shift) <= ELT_MULT_MAX."""
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


def qlinear_add(va: np.ndarray, vb: np.ndarray, a: Quant, b: Quant, y: Quant) -> np.ndarray:
    """onnxruntime's QLinearAdd (MLAS, AVX2/FMA) on int8 ``va``, ``vb``: in float32,
    ``t = fma(va, ra, fma(vb, rb, fixed))``, ``y = sat8(round_half_even(t))`` with
    ``ra = sa / sy``, ``rb = sb / sy`` and ``fixed = zy - fma(ra, za, rb * zb)``.

    Each fma is computed in float64 (the products of a float32 and an 8-bit integer are
    exact there) and rounded once to float32."""
    f32, f64 = np.float32, np.float64
    ra = f32(a.scale) / f32(y.scale)
    rb = f32(b.scale) / f32(y.scale)
    fixed = f32(y.zero_point) - f32(f64(ra) * f64(a.zero_point) + f64(rb * f32(b.zero_point)))
    t = (np.asarray(vb, f64) * f64(rb) + f64(fixed)).astype(f32)
    t = (np.asarray(va, f64) * f64(ra) + t.astype(f64)).astype(f32)
    return np.clip(np.rint(t), INT8_MIN, INT8_MAX).astype(np.int64)


def add_step(a: Quant, b: Quant, y: Quant, other: str, clamp_min: int = INT8_MIN,
             clamp_max: int = INT8_MAX, fused: bool = False) -> Step:
    """ELTWISE ADD parameters for ``y = a + b`` requantized; ``other`` names operand b.

    The target is what onnxruntime computes: its QLinearAdd kernel (:func:`qlinear_add`) when
    it fuses the QDQ pattern (``fused``: ``DQ, DQ -> Add -> Q``), else the float32 QDQ
    arithmetic ``Q(act(DQ(a) + DQ(b)))``. The multipliers are chosen among the nearest
    candidates to reproduce that on as many of the 65536 input pairs as possible (often all)."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    rb = float(np.float32(b.scale) / np.float32(y.scale))
    va, vb = np.meshgrid(_Q8, _Q8, indexing="ij")
    if fused:
        target = np.clip(qlinear_add(va, vb, a, b, y), clamp_min, clamp_max).ravel()
    else:
        target = np.clip(_quantize(_dequantize(va, a) + _dequantize(vb, b), y), clamp_min,
                         clamp_max).ravel()
    daf = (va - a.zero_point).ravel().astype(np.float64)
    dbf = (vb - b.zero_point).ravel().astype(np.float64)
    targetf = target.astype(np.float64)
    top = _shift_for(ra, rb)
    best, score = None, -1
    for shift in (top, top - 1):
        if shift < 0:
            continue
        ma0, mb0 = round(ra * (1 << shift)), round(rb * (1 << shift))
        cands = [(ma0 + i, mb0 + j) for i in (0, -1, 1, -2, 2) for j in (0, -1, 1, -2, 2)
                 if 0 <= ma0 + i <= ELT_MULT_MAX and 0 <= mb0 + j <= ELT_MULT_MAX]
        # |t| < 2**53: float64 holds every sum exactly, and scaling by 2**-shift then
        # rounding half to even is the integer round_shift (faster than int64 in numpy).
        ma = np.array([c[0] for c in cands], dtype=np.float64)
        mb = np.array([c[1] for c in cands], dtype=np.float64)
        t = daf[:, None] * ma[None, :] + dbf[:, None] * mb[None, :]
        got = np.clip(np.rint(t * 2.0 ** -shift) + y.zero_point, clamp_min, clamp_max)
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
    """ELTWISE ADD parameters for ``y = Q(DQ(a))`` with clamping, reproducing onnxruntime's
    float32 result (QLinearConcat's lookup table, QuantizeLinear of a dequantized value) on
    as many of the 256 inputs as possible (with 23-bit multipliers: all of them)."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    target = np.clip(_quantize(_dequantize(_Q8, a), y), clamp_min, clamp_max)

    def run(ma: int, shift: int) -> np.ndarray:
        return numerics.eltwise_add(_Q8, _Q8, a.zero_point, 0, ma, 0, shift, y.zero_point,
                                    clamp_min, clamp_max)

    top = _shift_for(ra)
    cands = [(round(ra * (1 << s)) + d, s) for s in (top, top - 1, top - 2) if s >= 0
             for d in (0, -1, 1, -2, 2, -3, 3) if 0 <= round(ra * (1 << s)) + d <= ELT_MULT_MAX]
    ma, shift = _best(cands, target, run)
    return Step("rescale", a_zero=a.zero_point, a_mult=ma, shift=shift,
                zero_point=y.zero_point, clamp_min=clamp_min, clamp_max=clamp_max)


def quantize_scalar(x: float, q: Quant) -> int:
    """``QuantizeLinear`` of one float (round half to even, saturate to int8)."""
    v = np.round(np.float32(x) / np.float32(q.scale)) + q.zero_point
    return int(np.clip(v, INT8_MIN, INT8_MAX))


def is_identity(step: Step) -> bool:
    """A rescale that maps every int8 value to itself (same scale and zero point, no clamp)."""
    return (step.kind == "rescale" and step.a_zero == step.zero_point and step.b_mult == 0
            and step.a_mult == 1 << step.shift and step.clamp_min <= INT8_MIN
            and step.clamp_max >= INT8_MAX)
