"""Quantization arithmetic: requantization multipliers and vector-unit step parameters.

onnxruntime (the reference) requantizes a QLinearConv/QGemm output as
``round_half_even(float32(acc) * float32(sx * sw / sy)) + zy`` with the scale computed in
float32. A float32 has a 24-bit mantissa, so :func:`npu.numerics.quantize_multiplier` (31-bit
multiplier) represents that float32 scale *exactly*, and the NPU's integer VECTOR reproduces
onnxruntime's result except where float32 rounding of the product itself crosses a tie.

ELTWISE has 16-bit multipliers: :func:`add_step` picks the largest shift that keeps both in
range (relative error about 2**-15), and :func:`rescale_step` likewise for one operand.
"""

from __future__ import annotations

import numpy as np

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


def add_step(a: Quant, b: Quant, y: Quant, other: str, clamp_min: int = INT8_MIN,
             clamp_max: int = INT8_MAX) -> Step:
    """ELTWISE ADD parameters for ``y = Q(DQ(a) + DQ(b))``; ``other`` names operand b."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    rb = float(np.float32(b.scale) / np.float32(y.scale))
    shift = _shift_for(ra, rb)
    return Step("add", a_zero=a.zero_point, a_mult=round(ra * (1 << shift)), shift=shift,
                zero_point=y.zero_point, clamp_min=clamp_min, clamp_max=clamp_max, other=other,
                b_zero=b.zero_point, b_mult=round(rb * (1 << shift)))


def rescale_step(a: Quant, y: Quant, clamp_min: int = INT8_MIN,
                 clamp_max: int = INT8_MAX) -> Step:
    """ELTWISE ADD (b_mult 0) parameters for ``y = Q(DQ(a))`` with clamping."""
    ra = float(np.float32(a.scale) / np.float32(y.scale))
    shift = _shift_for(ra)
    return Step("rescale", a_zero=a.zero_point, a_mult=round(ra * (1 << shift)), shift=shift,
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
