"""Small RTL blocks against their definitions: the arithmetic of npu.numerics (rounding, clamp,
requantize, eltwise), the delay line, the FIFO and the DRAM model's latency and byte lanes."""

from __future__ import annotations

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data
from hwsim import comb_eval, read_dram, simulate, small_config, word_of

from npu import numerics
from npu.hw.common import DelayLine, Fifo, clamp_int8, round_shift
from npu.hw.decode import INSTR_LAYOUTS
from npu.hw.dram import DRAMModel
from npu.hw.vector import eltwise_lane, requantize_lane
from npu.isa import Instr, Opcode


def test_round_shift_and_clamp_match_numerics() -> None:
    m = Module()
    x, s = Signal(signed(64)), Signal(6)
    lo, hi = Signal(signed(8)), Signal(signed(8))
    y, z = Signal(signed(66)), Signal(signed(8))
    m.d.comb += [y.eq(round_shift(m, x, s)), z.eq(clamp_int8(m, y, lo, hi))]
    rng = np.random.default_rng(0)
    cases, expect = [], []
    for k in range(2000):
        if k % 3 == 0:       # ties and small values
            sv = int(rng.integers(0, 5))
            xv = int(rng.integers(-40, 40)) << max(sv - 1, 0)
        else:
            xv = int(rng.integers(-2**62, 2**62)) >> int(rng.integers(0, 62))
            sv = int(rng.integers(0, 64))
        lv, hv = (int(v) for v in rng.integers(-128, 128, 2))
        cases.append([(x, xv), (s, sv), (lo, lv), (hi, hv)])
        r = int(numerics.round_shift(np.int64(xv), np.int64(sv)))
        expect.append([r, int(numerics.clamp(r, lv, hv))])
    assert comb_eval(m, cases, [y, z]) == expect


def _rne_drop(v: np.ndarray, k: np.ndarray | int) -> np.ndarray:
    """``v / 2**k`` rounded half to even, for int64 ``v >= 0`` and ``k >= 1``."""
    k = np.asarray(k, dtype=np.int64)
    q = v >> k
    guard = (v >> (k - 1)) & 1
    sticky = (v & ((np.int64(1) << (k - 1)) - 1)) != 0
    return q + (guard & (sticky | (q & 1)))


def fp32_product_model(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """The integer algorithm of ``requantize_lane``'s fp32 mode, before zero point and clamp:
    ``rne(clip(f32(f32(x) * scale), +-2**15))`` for int32 ``x`` and binary32 ``bits``, with
    integers only (the plan the RTL follows, step for step)."""
    x = np.asarray(x, dtype=np.int64)
    u = np.asarray(bits, dtype=np.int64) & 0xFFFFFFFF
    e = (u >> 23) & 0xFF
    n = np.abs(x)
    z = np.zeros_like(n)
    for w in (16, 8, 4, 2, 1):                 # normalise: leading one of |x| to bit 31
        t = (n >> (32 - w)) == 0
        n = np.where(t, (n << w) & 0xFFFFFFFF, n)
        z += t * w
    mx = _rne_drop(n, 8)                       # f32(|x|) = mx * 2**(z - 8), mx in [2**23, 2**24]
    prod = mx * ((u & 0x7FFFFF) | (1 << 23))   # in [2**46, 2**48)
    h = prod >> 47
    q = _rne_drop(np.where(h == 1, prod, prod << 1), 24)   # f32(product) = q * 2**-d
    d = z + 119 - h - e
    mag = np.where(d <= 8, numerics.F32_PRODUCT_LIMIT, _rne_drop(q, np.clip(d, 9, 40)))
    mag = np.where((n == 0) | (e == 0) | (e == 0xFF), 0, mag)
    return np.where((x < 0) != (u >> 31 == 1), -mag, mag)


def fp32_cases(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, scale bits)`` for the fp32 mode, in five equal parts: uniform words; products near
    a half-integer of the int8 range (scale = f32((y + 1/2) / x) +- 2 ulp), where each rounding
    step decides the result; exact ties (``x = odd * 2**(j-1)``, scale ``2**-j``, and x of 25
    significant bits, a tie of f32(x)); far exponents; special values (exponent field 0, 255,
    1, 254, x = 0, +-2**31 ...). About half the scales are negative."""
    k = size // 5
    x_near = rng.integers(-2**31, 2**31, k) >> rng.integers(0, 31, k)
    x_near = np.where(x_near == 0, 7, x_near)
    near = numerics.f32_bits((rng.integers(-128, 128, k) + 0.5) / x_near) + rng.integers(-2, 3, k)
    j = rng.integers(1, 16, k)
    odd = np.where(rng.random(k) < 0.5, rng.integers(-2**15, 2**15, k) | 1,
                   rng.integers(2**24, 2**25, k) | 1)
    x_special = rng.choice([0, 1, -1, 3, -2**31, 2**31 - 1, 2**24 + 1, -(2**24 + 3), 2**25 + 2,
                            2**31 - 2**7, 2**31 - 2**7 - 1], size - 4 * k)
    x = np.concatenate([rng.integers(-2**31, 2**31, k), x_near,
                        numerics.wrap_int32(odd << (j - 1)),
                        rng.integers(-2**31, 2**31, k) >> rng.integers(0, 32, k), x_special])
    e = rng.choice([0, 255, 1, 254, 100, 103, 104, 117, 126, 127, 140, 150], size - 4 * k)
    mant = np.where(rng.random(size - 4 * k) < 0.5,
                    rng.choice([0, 1, 0x400000, 0x7FFFFF], size - 4 * k),
                    rng.integers(0, 1 << 23, size - 4 * k))
    far = rng.integers(1, 255, k) << 23 | rng.integers(0, 1 << 23, k)
    bits = np.concatenate([rng.integers(-2**31, 2**31, k), near,
                           numerics.f32_bits(2.0 ** -j.astype(np.float64)), far, e << 23 | mant])
    flip = (rng.random(size) < 0.5) & (np.arange(size) >= 2 * k)   # the first two: signed already
    return x, numerics.wrap_int32(np.where(flip, bits ^ (1 << 31), bits))


def test_fp32_integer_model_matches_float32() -> None:
    """The integer plan against numpy's IEEE float32 arithmetic on millions of inputs: the
    product before the zero point, and numerics.requantize(fp32=1) with zero point and clamp."""
    rng = np.random.default_rng(11)
    ties = 0
    for k in range(4):
        x, bits = fp32_cases(rng, 1_000_000)
        with np.errstate(over="ignore"):
            p = x.astype(np.float32) * numerics.f32_scales(bits)
        inside = np.abs(p) < 2**15
        ties += int((np.abs(p[inside] - np.trunc(p[inside])) == 0.5).sum())
        expect = np.rint(np.clip(p, -2.0**15, 2.0**15)).astype(np.int64)
        got = fp32_product_model(x, bits)
        bad = np.flatnonzero(got != expect)
        assert bad.size == 0, (x[bad[0]], hex(bits[bad[0]] & 0xFFFFFFFF), got[bad[0]])
        zp, lo, hi = (int(v) for v in rng.integers(-128, 128, 3)) if k else (0, -128, 127)
        with np.errstate(over="ignore"):
            want = numerics.requantize(x, 0, bits, 0, zp, lo, hi, fp32=1)
        assert np.array_equal(numerics.clamp(got + zp, lo, hi), want)
    assert ties > 30_000          # the cases do exercise round-half-to-even


def test_requantize_lane_matches_numerics() -> None:
    m = Module()
    acc, bias, mult, shift = (Signal(signed(32)) for _ in range(4))
    zp, lo, hi = (Signal(signed(8)) for _ in range(3))
    fp32 = Signal()
    out = Signal(signed(8))
    m.d.comb += out.eq(requantize_lane(m, acc, bias, mult, shift, zp, lo, hi, fp32))
    rng = np.random.default_rng(1)
    cases, expect = [], []
    for _ in range(1500):
        a, b = (int(v) for v in rng.integers(-2**31, 2**31, 2))
        mu = int(rng.integers(-2**31, 2**31)) if rng.random() < 0.3 else \
            int(rng.integers(2**30, 2**31))
        sh = int(rng.integers(-2**31, 2**31)) if rng.random() < 0.2 else int(rng.integers(0, 64))
        z, lv, hv = (int(v) for v in rng.integers(-128, 128, 3))
        cases.append([(acc, a), (bias, b), (mult, mu), (shift, sh), (zp, z), (lo, lv), (hi, hv),
                      (fp32, 0)])
        expect.append([int(numerics.requantize(np.int64(a), np.int64(b), np.int64(mu),
                                               np.int64(sh), z, lv, hv))])
    # fp32 mode: half of the cases with zero point 0 and no clamp, so that every rounding shows.
    x, bits = fp32_cases(rng, 2500)
    near = rng.random(x.size) < 0.5
    for xv, bv, nv in zip(x.tolist(), bits.tolist(), near.tolist()):
        b = int(rng.integers(-2**31, 2**31)) if rng.random() < 0.2 else 0
        a = numerics.wrap_int32(xv - b).item()         # acc + bias wraps back to x
        z, lv, hv = (0, -128, 127) if nv else (int(v) for v in rng.integers(-128, 128, 3))
        sh = int(rng.integers(-2**31, 2**31))          # ignored
        cases.append([(acc, a), (bias, b), (mult, bv), (shift, sh), (zp, z), (lo, lv), (hi, hv),
                      (fp32, 1)])
        with np.errstate(over="ignore"):
            expect.append([int(numerics.requantize(np.int64(a), np.int64(b), np.int64(bv),
                                                   np.int64(sh), z, lv, hv, fp32=1))])
    assert comb_eval(m, cases, [out]) == expect


@pytest.mark.parametrize("func", [0, 1])
def test_eltwise_lane_matches_numerics(func: int) -> None:
    m = Module()
    word = Signal(256)
    f = data.View(INSTR_LAYOUTS[Opcode.ELTWISE], word)
    a, b = Signal(signed(8)), Signal(signed(8))
    out = Signal(signed(8))
    m.d.comb += out.eq(eltwise_lane(m, a, b, f))
    rng = np.random.default_rng(2 + func)
    cases, expect = [], []
    # Stimuli over the fields' ranges (unsigned multipliers, 0 and the maximum included).
    mult_max, shift_max = (1 << len(f.a_mult)) - 1, (1 << len(f.shift)) - 1
    for _ in range(600):
        fv = {"func": func, "shift": int(rng.integers(0, shift_max + 1)),
              **{k: int(rng.choice([0, mult_max, rng.integers(0, mult_max + 1),
                                    rng.integers(0, 1 << int(rng.integers(1, len(f.a_mult) + 1)))]))
                 for k in ("a_mult", "b_mult")}}
        for k in ("a_zero", "b_zero", "zero_point", "clamp_min", "clamp_max"):
            fv[k] = int(rng.integers(-128, 128))
        av, bv = (int(v) for v in rng.integers(-128, 128, 2))
        w = word_of(Instr(Opcode.ELTWISE, 0, 0, fv))
        cases.append([(word, w), (a, av), (b, bv)])
        if func == 0:
            y = numerics.eltwise_add(av, bv, fv["a_zero"], fv["b_zero"], fv["a_mult"],
                                     fv["b_mult"], fv["shift"], fv["zero_point"],
                                     fv["clamp_min"], fv["clamp_max"])
        else:
            y = numerics.eltwise_max(av, bv, fv["clamp_min"], fv["clamp_max"])
        expect.append([int(y)])
    assert comb_eval(m, cases, [out]) == expect


@pytest.mark.parametrize("delay", [0, 1, 3, 4, 9])
def test_delay_line(delay: int) -> None:
    dut = DelayLine(16, delay)
    seq = list(np.random.default_rng(delay).integers(1, 2**16, 40))
    seen = []

    async def bench(ctx):
        for v in seq + [0] * (delay + 1):
            ctx.set(dut.i, int(v))
            seen.append(ctx.get(dut.o))
            await ctx.tick()

    top = Module()          # a clock domain even when the line is a wire (delay 0)
    top.submodules.dut = dut
    toggle = Signal()
    top.d.sync += toggle.eq(~toggle)
    simulate(top, bench)
    # Output is zero until the line has filled (the ring's contents are undefined after reset).
    assert seen[:delay] == [0] * delay
    assert seen[delay:delay + len(seq)] == [int(v) for v in seq]


def test_fifo_push_pop_when_full() -> None:
    dut = Fifo(8, 3)
    model: list[int] = []
    rng = np.random.default_rng(3)

    async def bench(ctx):
        for k in range(300):
            level = ctx.get(dut.level)
            assert level == len(model)
            if model:
                assert ctx.get(dut.head) == model[0]
            if len(model) > 1:
                assert ctx.get(dut.head2) == model[1]
            pop = bool(model) and rng.random() < 0.5
            push = (len(model) - pop < 3) and rng.random() < 0.6
            v = k & 0xFF
            ctx.set(dut.pop, pop)
            ctx.set(dut.push, push)
            ctx.set(dut.data, v)
            await ctx.tick()
            if pop:
                model.pop(0)
            if push:
                model.append(v)

    simulate(dut, bench)


def test_dram_model_latency_and_unaligned_beats() -> None:
    cfg = small_config(dram_latency=3, dram_beat_bytes=4)
    image = np.random.default_rng(4).integers(0, 256, 256, dtype=np.uint8)
    dut = DRAMModel(cfg, 256, init=image)
    expect = image.copy()
    got = {}

    async def bench(ctx):
        # Reads at unaligned addresses: data arrives dram_latency cycles after the request.
        addrs = [0, 1, 2, 3, 5, 250, 253]
        for t in range(len(addrs) + cfg.dram_latency + 1):
            if t < len(addrs):
                ctx.set(dut.rd.req_valid, 1)
                ctx.set(dut.rd.req_addr, addrs[t])
            else:
                ctx.set(dut.rd.req_valid, 0)
            if ctx.get(dut.rd.resp_valid):
                got[addrs[t - cfg.dram_latency]] = list(ctx.get(dut.rd.resp_data))
            await ctx.tick()
        # A masked, unaligned write lands dram_latency - 1 cycles later.
        ctx.set(dut.wr.valid, 1)
        ctx.set(dut.wr.addr, 7)
        ctx.set(dut.wr.data, [0xA0, 0xA1, 0xA2, 0xA3])
        ctx.set(dut.wr.mask, 0b1011)
        await ctx.tick()
        ctx.set(dut.wr.valid, 0)
        await ctx.tick().repeat(cfg.dram_latency - 2)
        assert ctx.get(dut.lanes[3][1]) == image[7]        # not yet
        await ctx.tick()
        got["dram"] = read_dram(ctx, dut)

    simulate(dut, bench)
    for a in (0, 1, 2, 3, 5, 250, 253):
        assert got[a] == [int(image[(a + k) % 256]) for k in range(4)], a
    expect[[7, 8, 10]] = [0xA0, 0xA1, 0xA3]
    assert np.array_equal(got["dram"], expect)
