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


def test_requantize_lane_matches_numerics() -> None:
    m = Module()
    acc, bias, mult, shift = (Signal(signed(32)) for _ in range(4))
    zp, lo, hi = (Signal(signed(8)) for _ in range(3))
    out = Signal(signed(8))
    m.d.comb += out.eq(requantize_lane(m, acc, bias, mult, shift, zp, lo, hi))
    rng = np.random.default_rng(1)
    cases, expect = [], []
    for _ in range(1500):
        a, b = (int(v) for v in rng.integers(-2**31, 2**31, 2))
        mu = int(rng.integers(-2**31, 2**31)) if rng.random() < 0.3 else \
            int(rng.integers(2**30, 2**31))
        sh = int(rng.integers(-2**31, 2**31)) if rng.random() < 0.2 else int(rng.integers(0, 64))
        z, lv, hv = (int(v) for v in rng.integers(-128, 128, 3))
        cases.append([(acc, a), (bias, b), (mult, mu), (shift, sh), (zp, z), (lo, lv), (hi, hv)])
        expect.append([int(numerics.requantize(np.int64(a), np.int64(b), np.int64(mu),
                                               np.int64(sh), z, lv, hv))])
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
    for _ in range(600):
        fv = {"func": func, "shift": int(rng.integers(0, 64)),
              "a_mult": int(rng.integers(-2**15, 2**15)),
              "b_mult": int(rng.integers(-2**15, 2**15))}
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
