"""An exact-arithmetic oracle of VECTOR's fp32 requantization, independent of numpy's floats.

``y = clamp(rne_int(rne24(rne24(x) * scale)) + zero_point)`` with every rounding done on
:class:`fractions.Fraction` values, the scale decoded from its bit pattern by hand. Shared by
``tests/test_numerics_fp32.py`` and ``tests/runtime/test_vector_fp32.py``.
"""

from __future__ import annotations

from fractions import Fraction

#: |product| beyond which the result saturates (docs/architecture.md, VECTOR).
LIMIT = 1 << 15


def rne_int(q: Fraction) -> int:
    """Nearest integer, ties to even."""
    fl = q.numerator // q.denominator
    rest = q - fl
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and fl % 2 == 1):
        return fl + 1
    return fl


def rne24(q: Fraction) -> Fraction:
    """``q`` rounded to 24 significant bits, ties to even (binary32's precision; the values
    used here stay inside its normal range or are clipped right after)."""
    if q == 0:
        return q
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()   # 2**e <= a < 2**(e+2)
    if Fraction(2) ** e > a:
        e -= 1
    if Fraction(2) ** (e + 1) <= a:
        e += 1
    unit = Fraction(2) ** (e - 23)                               # ulp of [2**e, 2**(e+1))
    r = rne_int(a / unit) * unit
    return r if q > 0 else -r


def scale_of(bits: int) -> Fraction:
    """The binary32 value of a bit pattern; exponent field 0 or 255 is scale 0."""
    bits &= 0xFFFFFFFF
    exp = (bits >> 23) & 0xFF
    if exp in (0, 0xFF):
        return Fraction(0)
    value = Fraction((1 << 23) | (bits & 0x7FFFFF), 1 << 23) * Fraction(2) ** (exp - 127)
    return -value if bits >> 31 else value


def wrap32(x: int) -> int:
    return (x + (1 << 31)) % (1 << 32) - (1 << 31)


def requantize_fp32(acc: int, bias: int, bits: int, zero_point: int, clamp_min: int,
                    clamp_max: int) -> int:
    """One lane of VECTOR with ``fp32=1``, exactly."""
    x = Fraction(wrap32(acc + bias))
    p = rne24(rne24(x) * scale_of(bits))
    p = max(min(p, Fraction(LIMIT)), Fraction(-LIMIT))
    y = min(max(rne_int(p) + zero_point, clamp_min), clamp_max)
    return min(max(y, -128), 127)
