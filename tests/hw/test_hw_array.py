"""The processing element and the systolic array against numerics.matmul."""

from __future__ import annotations

import numpy as np
from hwsim import simulate, small_config

from npu import numerics
from npu.hw.array import PE, SystolicArray


def test_pe_multiply_accumulates_with_two_banks() -> None:
    dut = PE()
    rng = np.random.default_rng(0)

    async def bench(ctx):
        w = [int(v) for v in rng.integers(-128, 128, 2)]
        for bank in (0, 1):
            ctx.set(dut.w_en, 1)
            ctx.set(dut.w_bank, bank)
            ctx.set(dut.w_data, w[bank])
            await ctx.tick()
        ctx.set(dut.w_en, 0)
        for _ in range(50):
            x, p, sel = int(rng.integers(-128, 128)), int(rng.integers(-2**31, 2**31)), \
                int(rng.integers(0, 2))
            ctx.set(dut.x_in, x)
            ctx.set(dut.psum_in, p)
            ctx.set(dut.sel_in, sel)
            await ctx.tick()
            assert ctx.get(dut.psum_out) == int(numerics.wrap_int32(p + x * w[sel]))
            assert ctx.get(dut.x_out) == x and ctx.get(dut.sel_out) == sel

    simulate(dut, bench)


def test_array_streams_vectors_with_per_vector_bank() -> None:
    cfg = small_config()
    dut = SystolicArray(cfg)
    rng = np.random.default_rng(1)
    weights = rng.integers(-128, 128, (2, cfg.rows, cfg.cols))
    xs = rng.integers(-128, 128, (30, cfg.rows))
    sels = rng.integers(0, 2, 30)
    outs = []

    async def bench(ctx):
        for bank in (0, 1):
            for k in range(cfg.rows):
                ctx.set(dut.weights, {"en": 1, "bank": bank, "row": k,
                                      "data": [int(v) for v in weights[bank, k]]})
                await ctx.tick()
        ctx.set(dut.weights.en, 0)
        # Back to back, banks switching between consecutive vectors (no drain).
        for t in range(len(xs) + dut.latency):
            if t < len(xs):
                ctx.set(dut.x, [int(v) for v in xs[t]])
                ctx.set(dut.sel, int(sels[t]))
            if t >= dut.latency:
                outs.append(list(ctx.get(dut.y)))
            await ctx.tick()

    simulate(dut, bench)
    expect = [numerics.matmul(xs[j:j + 1], weights[sels[j]])[0].tolist() for j in range(len(xs))]
    assert outs == expect
    assert dut.latency == cfg.rows + cfg.cols - 1
