"""The VX engine's vector unit: VECTOR (ACC -> SPAD requantization) and ELTWISE (SPAD (+) SPAD).

One row per cycle, ``cols`` lanes. Issue at cycle ``s + j`` reads the memories; the row arrives at
``s + j + 1`` and is computed there (:func:`requantize_row`, :func:`eltwise_row`); the result
waits ``vx_depth - 1`` cycles in the write pipeline and is written at ``s + j + vx_depth``, so
the last row is in SPAD at the end of ``c - 1``. VECTOR first reads its three parameter rows
(bias, multiplier, shift) at ``s .. s + 2``, hence its ``n + 3`` busy cycles.
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from npu import isa
from npu.isa import EltFunc, NPUConfig, Opcode
from npu.numerics import F32_PRODUCT_LIMIT

from .common import (
    DelayLine,
    Walk,
    clamp_int8,
    comb_signal,
    mem_signatures,
    round_shift,
    spad_row,
    start_signature,
    wrap32,
)
from .decode import opcode_of, view

__all__ = ["VectorUnit", "requantize_lane", "eltwise_lane"]

_ROW = 20


def _rne_drop(v: Value, k: int) -> Value:
    """Unsigned ``v / 2**k`` rounded half to even, for a constant ``k >= 1``."""
    q = v[k:]
    return q + (v[k - 1] & (v[:k - 1].any() | q[0]))


def requantize_lane(m: Module, acc: Value, bias: Value, mult: Value, shift: Value,
                    zero_point: Value, lo: Value, hi: Value, fp32: Value) -> Value:
    """``numerics.requantize`` for one lane (int32 inputs, int8 result), both modes.

    ``fp32 = 1`` computes ``rne(f32(f32(x) * scale))`` (``mult`` holds the binary32 bit pattern)
    in integer logic: ``|x|`` is normalised (leading-one shifter) and rounded to a 24-bit
    mantissa, multiplied by the scale's 24-bit mantissa on the integer mode's multiplier, the
    48-bit product rounded to 24 bits, and that shifted right by the combined exponent, rounded
    to an integer; every rounding is to nearest even, as in IEEE-754. A product of at least
    ``2**15`` saturates (``numerics.F32_PRODUCT_LIMIT``), exponent field 0 or 255 is scale 0.
    """
    x = comb_signal(m, wrap32(acc + bias))
    bits = Value.cast(mult)
    # f32(x): |x| < 2**32 normalised so that bit 31 is its leading one; z = leading zeros.
    n = comb_signal(m, Mux(x[31], -x, x)[:32], "f32_norm0")
    zbits = []
    for w in (16, 8, 4, 2, 1):
        t = comb_signal(m, n[32 - w:] == 0, f"f32_z{w}")
        n = comb_signal(m, Mux(t, n << w, n)[:32], f"f32_norm{w}")
        zbits.append(t)
    z = Cat(*reversed(zbits))                       # |x| in [2**(31-z), 2**(32-z))
    mx = comb_signal(m, _rne_drop(n, 8), "f32_mx")  # in [2**23, 2**24]: f32(|x|) / 2**(8-z)
    ms = Cat(bits[:23], Const(1, 1))                # hidden bit: scale mantissa in [2**23, 2**24)
    e = bits[23:31]
    # One multiplier for both modes: x * mult, or the two mantissas (product < 2**48).
    prod = comb_signal(m, Mux(fp32, mx, x) * Mux(fp32, ms, mult))
    # f32(product): h = 1 when the product has 48 significant bits; q in [2**23, 2**24].
    h = prod[47]
    q = comb_signal(m, _rne_drop(Mux(h, prod[:48], prod[:47] << 1), 24), "f32_q")
    # The float product is q * 2**-d with d = z + 119 - h - e; d <= 8 means >= 2**15.
    sat = comb_signal(m, z + 111 <= h + e, "f32_sat")
    d = comb_signal(m, (z + 119 - (h + e))[:9], "f32_d")   # in [9, 149] unless sat
    rounded = round_shift(m, Cat(q, Const(0, 1)).as_signed(), Mux(d > 31, 31, d)[:5])
    mag = Mux(sat, F32_PRODUCT_LIMIT, rounded)
    zero = ~n[31] | (e == 0) | (e == 0xFF)
    mag = comb_signal(m, Mux(zero, 0, mag), "f32_mag")
    y_f32 = comb_signal(m, Mux(x[31] ^ bits[31], -mag, mag), "f32_y")
    y_int = round_shift(m, prod, shift[:6])
    return clamp_int8(m, Mux(fp32, y_f32, y_int) + zero_point, lo, hi)


def eltwise_lane(m: Module, a: Value, b: Value, f: data.View) -> Value:
    """``numerics.eltwise_add`` / ``eltwise_max`` for one lane; ``f`` is the ELTWISE view."""
    # signed(9) x unsigned(23) products are signed(32), their sum signed(33): exact, as the
    # int64 of numerics (Amaranth sizes every operator for its full result).
    t = comb_signal(m, (a - f.a_zero) * f.a_mult + (b - f.b_zero) * f.b_mult)
    add = clamp_int8(m, round_shift(m, t, f.shift) + f.zero_point, f.clamp_min, f.clamp_max)
    mx = clamp_int8(m, Mux(a > b, a, b), f.clamp_min, f.clamp_max)
    return Mux(f.func == int(EltFunc.ADD), add, mx)  # func is 1 bit: ADD or MAX


class VectorUnit(wiring.Component):
    """VX unit: VECTOR and ELTWISE, one row per cycle."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        sigs = mem_signatures(cfg)
        super().__init__({
            "start": In(start_signature(cfg)),
            "acc_r": sigs["acc_r"],
            "spad_ra": sigs["spad_r"],
            "spad_rb": sigs["spad_r"],
            "spad_w": sigs["spad_w"],
            "busy": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        cfg = self.cfg
        go, p = self.start.valid, self.start.payload
        saved = Signal(isa.INSTR_BITS)
        with m.If(go):
            m.d.sync += saved.eq(p.word)
        word = Mux(go, p.word, saved)
        is_vec = opcode_of(word) == int(Opcode.VECTOR)
        vec, elt = view(Opcode.VECTOR, word), view(Opcode.ELTWISE, word)
        running = Signal()
        active = go | running
        m.d.comb += self.busy.eq(active)

        # VECTOR: counter over 3 parameter rows then n data rows.
        vc_r = Signal(17)
        vc = Mux(go, 0, vc_r)
        vrow = vc - isa.VECTOR_PARAM_ROWS
        vec_done = vc == vec.n + (isa.VECTOR_PARAM_ROWS - 1)
        with m.If(active & is_vec):
            m.d.sync += vc_r.eq(vc + 1)
        # ELTWISE: 2-D walks over A and B, contiguous destination.
        w = Walk(m, go, elt.n_inner, elt.n_outer, name="elt")
        a_addr = w.stream(elt.a_addr, elt.a_stride_outer, elt.a_stride_inner, _ROW)
        b_addr = w.stream(elt.b_addr, elt.b_stride_outer, elt.b_stride_inner, _ROW)
        e_dst = w.stream(elt.dst, elt.n_inner, 1, _ROW)
        w.build(active & ~is_vec)
        m.d.sync += running.eq(active & ~Mux(is_vec, vec_done, w.last))

        K_PARAM, K_VROW, K_EROW = 0, 1, 2
        meta_layout = data.StructLayout({"valid": 1, "kind": 2, "param": 2, "dst": _ROW})
        q = Signal(meta_layout)
        word_q = Signal(isa.INSTR_BITS)  # the instruction whose row is in the data stage
        m.d.sync += [q.valid.eq(active), word_q.eq(word),
                     q.kind.eq(Mux(is_vec, Mux(vc < isa.VECTOR_PARAM_ROWS, K_PARAM, K_VROW),
                                   K_EROW)),
                     q.param.eq(vc[:2]),
                     q.dst.eq(Mux(is_vec, vec.spad_addr + vrow, e_dst))]
        m.d.comb += [self.acc_r.addr.eq(Mux(vc < isa.VECTOR_PARAM_ROWS, vec.param_addr + vc,
                                            vec.acc_addr + vrow)),
                     self.spad_ra.addr.eq(a_addr), self.spad_rb.addr.eq(b_addr)]

        # Data stage: capture parameter rows, or compute a result row.
        params = [Signal(data.ArrayLayout(signed(32), cfg.cols), name=n)
                  for n in ("bias", "mult", "shift")]
        for k, reg in enumerate(params):
            with m.If(q.valid & (q.kind == K_PARAM) & (q.param == k)):
                m.d.sync += reg.eq(self.acc_r.data)
        vq, eq_ = view(Opcode.VECTOR, word_q), view(Opcode.ELTWISE, word_q)
        res = Signal(spad_row(cfg))
        for c in range(cfg.cols):
            r_vec = requantize_lane(m, self.acc_r.data[c], params[0][c], params[1][c],
                                    params[2][c], vq.zero_point, vq.clamp_min, vq.clamp_max,
                                    vq.fp32)
            r_elt = eltwise_lane(m, self.spad_ra.data[c], self.spad_rb.data[c], eq_)
            m.d.comb += res[c].eq(Mux(q.kind == K_VROW, r_vec, r_elt))

        out_layout = data.StructLayout({"valid": 1, "dst": _ROW, "row": spad_row(cfg)})
        m.submodules.wb = wb = DelayLine(out_layout, cfg.vx_depth - 1)
        m.d.comb += [wb.i.valid.eq(q.valid & (q.kind != K_PARAM)), wb.i.dst.eq(q.dst),
                     wb.i.row.eq(res),
                     self.spad_w.en.eq(wb.o.valid), self.spad_w.addr.eq(wb.o.dst),
                     self.spad_w.data.eq(wb.o.row)]
        return m
