"""Each functional unit between real memories: its results against the semantics of
docs/architecture.md (numpy loops here, numerics for the arithmetic), and its timing against the
contract: busy for exactly `busy` cycles from its start, every result in place at completion
`c = s + latency`, nothing written afterwards. Instructions run back to back (each starts when
the previous one's busy cycles end), so the units' overlapping latencies are exercised."""

from __future__ import annotations

from typing import Any

import numpy as np
from hwsim import UnitBench, read_dram, read_rows, simulate, small_config, start_unit, write_rows

from npu import numerics
from npu.hw.dma import LoadUnit, StoreUnit
from npu.hw.execute import ExecuteEngine
from npu.hw.vector import VectorUnit
from npu.isa import VECTOR_PARAM_ROWS, Instr, NPUConfig, Opcode, timing


async def run_back_to_back(ctx: Any, cfg: NPUConfig, starts: list[tuple[Any, Instr, int]],
                           busy_signals: list[Any]) -> list[int]:
    """Start each ``(port, instr, bank)`` when the previous one's busy cycles end; check the
    ``busy`` outputs; return to the cycle after the last completion. Returns start cycles."""
    t, s, plan, busy_until = 0, 0, [], 0
    for port, ins, bank in starts:
        tm = timing(ins, cfg)
        plan.append((s, port, ins, bank, tm))
        s += tm.busy
    end = max(p[0] + p[4].latency for p in plan)
    pending = list(plan)
    while t < end:
        if pending and pending[0][0] == t:
            _, port, ins, bank, tm = pending.pop(0)
            busy_until = t + tm.busy
            ctx.set(port.valid, 1)
            ctx.set(port.payload.word, int.from_bytes(ins.encode(), "little"))
            ctx.set(port.payload.bank, bank)
            ctx.set(port.payload.cycle, t)
        busy = any(ctx.get(b) for b in busy_signals)
        assert busy == (t < busy_until), f"cycle {t}: busy={busy}, expected until {busy_until}"
        await ctx.tick()
        for port, *_ in [(p[1],) for p in plan]:
            ctx.set(port.valid, 0)
        t += 1
    return [p[0] for p in plan]


def load_model(cfg: NPUConfig, f: dict, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray
               ) -> None:
    mem = spad.view(np.uint8) if f["mem"] == 0 else acc.view(np.uint8)
    rb = f["row_bytes"]
    for o in range(f["n_outer"]):
        for i in range(f["n_inner"]):
            row = f["dst"] + o * f["dst_stride_outer"] + i
            src = f["dram_addr"] + o * f["dram_stride_outer"] + i * f["dram_stride_inner"]
            mem[row, :rb] = (f["fill_value"] & 0xFF) if f["fill"] else dram[src:src + rb]
            mem[row, rb:] = 0


def test_load_unit_strided_fill_acc_and_gather() -> None:
    cfg = small_config(dram_beat_bytes=4)
    rng = np.random.default_rng(0)
    dram = rng.integers(0, 256, 1024, dtype=np.uint8)
    idx = np.array([3, 0, 7, 7, 1], dtype="<i4")
    dram[900:920] = np.frombuffer(idx.tobytes(), dtype=np.uint8)
    unit = LoadUnit(cfg)
    bench = UnitBench(cfg, unit, {"spad_w": ("spad", "w"), "acc_w": ("acc", "w")}, dram=dram)
    loads = [
        dict(dram_addr=5, dram_stride_outer=100, dram_stride_inner=7, dst=2, dst_stride_outer=6,
             n_inner=3, n_outer=2, row_bytes=3, mem=0, fill=0, fill_value=0),
        dict(dram_addr=301, dram_stride_outer=0, dram_stride_inner=16, dst=20, dst_stride_outer=0,
             n_inner=2, n_outer=1, row_bytes=13, mem=1, fill=0, fill_value=0),   # ACC, 4 beats
        dict(dram_addr=0, dram_stride_outer=0, dram_stride_inner=0, dst=30, dst_stride_outer=2,
             n_inner=1, n_outer=3, row_bytes=2, mem=0, fill=1, fill_value=-3),
    ]
    gather = dict(dram_addr=400, index_addr=900, row_stride=10, dst=40, n=5, row_bytes=4, mem=0)
    instrs = [Instr(Opcode.LOAD, 0, 0, f) for f in loads] + [Instr(Opcode.GATHER, 0, 0, gather)]
    out = {}

    async def test(ctx):
        await run_back_to_back(ctx, cfg, [(unit.start, i, 0) for i in instrs], [unit.busy])
        out["spad"] = read_rows(ctx, bench.spad, "<i1")
        out["acc"] = read_rows(ctx, bench.acc, "<i4")
        assert not ctx.get(unit.fault.valid)

    simulate(bench, test)
    spad = np.zeros((cfg.spad_rows, cfg.cols), np.int8)
    acc = np.zeros((cfg.acc_rows, cfg.cols), np.int32)
    for f in loads:
        load_model(cfg, f, dram, spad, acc)
    for k, i in enumerate(idx):
        spad.view(np.uint8)[40 + k] = dram[400 + 10 * i:400 + 10 * i + 4]
    assert np.array_equal(out["spad"], spad)
    assert np.array_equal(out["acc"], acc)


def test_gather_bad_index_faults_with_its_start_cycle() -> None:
    cfg = small_config()
    dram = np.zeros(256, dtype=np.uint8)
    dram[0:8] = np.frombuffer(np.array([1, -2], dtype="<i4").tobytes(), dtype=np.uint8)
    unit = LoadUnit(cfg)
    bench = UnitBench(cfg, unit, {"spad_w": ("spad", "w"), "acc_w": ("acc", "w")}, dram=dram,
                      dram_size=256)
    seen = []

    async def test(ctx):
        ctx.set(unit.dram_bytes, 256)
        await ctx.tick().repeat(3)
        await start_unit(ctx, unit.start, Instr(Opcode.GATHER, 0, 0, dict(
            dram_addr=16, index_addr=0, row_stride=4, dst=0, n=2, row_bytes=4, mem=0)),
            index=9, cycle=1234)
        for _ in range(40):
            if ctx.get(unit.fault.valid):
                seen.append((ctx.get(unit.fault.index), ctx.get(unit.fault.cycle)))
            await ctx.tick()

    simulate(bench, test)
    assert seen and seen[0] == (9, 1234)


def test_store_unit_strided_from_spad_and_acc() -> None:
    cfg = small_config(dram_beat_bytes=4)
    rng = np.random.default_rng(1)
    spad = rng.integers(-128, 128, (cfg.spad_rows, cfg.cols), dtype=np.int8)
    acc = rng.integers(-2**31, 2**31, (cfg.acc_rows, cfg.cols), dtype=np.int32)
    unit = StoreUnit(cfg)
    bench = UnitBench(cfg, unit, {"spad_r": ("spad", "r"), "acc_r": ("acc", "r")},
                      dram=np.zeros(1024, np.uint8))
    stores = [
        dict(dram_addr=3, dram_stride_outer=50, dram_stride_inner=5, src=4, src_stride_outer=9,
             n_inner=3, n_outer=2, row_bytes=3, mem=0),
        dict(dram_addr=501, dram_stride_outer=0, dram_stride_inner=17, src=7, src_stride_outer=0,
             n_inner=2, n_outer=1, row_bytes=14, mem=1),
        dict(dram_addr=700, dram_stride_outer=0, dram_stride_inner=4, src=0, src_stride_outer=0,
             n_inner=4, n_outer=1, row_bytes=4, mem=0),
    ]
    out = {}

    async def test(ctx):
        write_rows(ctx, bench.spad, spad)
        write_rows(ctx, bench.acc, acc)
        await run_back_to_back(ctx, cfg, [(unit.start, Instr(Opcode.STORE, 0, 0, f), 0)
                                          for f in stores], [unit.busy])
        out["dram"] = read_dram(ctx, bench.dram)

    simulate(bench, test)
    dram = np.zeros(1024, np.uint8)
    for f in stores:
        mem = spad.view(np.uint8) if f["mem"] == 0 else acc.view(np.uint8)
        for o in range(f["n_outer"]):
            for i in range(f["n_inner"]):
                row = f["src"] + o * f["src_stride_outer"] + i
                dst = f["dram_addr"] + o * f["dram_stride_outer"] + i * f["dram_stride_inner"]
                dram[dst:dst + f["row_bytes"]] = mem[row, :f["row_bytes"]]
    assert np.array_equal(out["dram"], dram)


def test_execute_engine_preload_swap_and_back_to_back_accumulation() -> None:
    cfg = small_config()
    r = cfg.rows
    rng = np.random.default_rng(2)
    spad = rng.integers(-128, 128, (cfg.spad_rows, cfg.cols), dtype=np.int8)
    acc0 = rng.integers(-2**31, 2**31, (cfg.acc_rows, cfg.cols), dtype=np.int32)
    ex = ExecuteEngine(cfg)
    bench = UnitBench(cfg, ex, {"spad_r_weights": ("spad", "r"), "spad_r_inputs": ("spad", "r"),
                                "acc_r": ("acc", "r"), "acc_w": ("acc", "w")})

    def mm(**f: int) -> Instr:
        base = dict(spad_addr=0, spad_stride_outer=0, spad_stride_inner=1, acc_addr=0,
                    n_inner=1, n_outer=1, accumulate=0, swap=0)
        return Instr(Opcode.MATMUL, 0, 0, {**base, **f})

    pre1 = Instr(Opcode.PRELOAD, 0, 0, {"spad_addr": 40})    # -> bank 1
    pre0 = Instr(Opcode.PRELOAD, 0, 0, {"spad_addr": 50})    # -> bank 0
    m1 = mm(spad_addr=1, spad_stride_outer=10, spad_stride_inner=2, acc_addr=3, n_inner=3,
            n_outer=2, swap=1)
    # Right after m1, accumulating first into the row m1 writes last (the cycle before).
    m2 = mm(spad_addr=20, acc_addr=8, n_inner=6, accumulate=1)
    m3 = mm(spad_addr=30, acc_addr=12, n_inner=2, accumulate=1, swap=1)
    out = {}

    async def test(ctx):
        write_rows(ctx, bench.spad, spad)
        write_rows(ctx, bench.acc, acc0)
        # PRELOAD bank 1; MATMUL swap at its completion; MATMUL right after; PRELOAD bank 0
        # beside them (its bank is free); MATMUL swap to bank 0 after it completes.
        t0 = timing(pre1, cfg)
        plan = {0: (ex.preload, pre1, 1), t0.latency: (ex.matmul, m1, 1),
                t0.latency + 6: (ex.matmul, m2, 1), t0.latency + 7: (ex.preload, pre0, 0),
                t0.latency + 12: (ex.matmul, m3, 0)}
        for t in range(t0.latency + 12 + timing(m3, cfg).latency + 1):
            if t in plan:
                port, ins, bank = plan[t]
                ctx.set(port.valid, 1)
                ctx.set(port.payload.word, int.from_bytes(ins.encode(), "little"))
                ctx.set(port.payload.bank, bank)
            await ctx.tick()
            ctx.set(ex.preload.valid, 0)
            ctx.set(ex.matmul.valid, 0)
        out["acc"] = read_rows(ctx, bench.acc, "<i4")

    simulate(bench, test)
    w1, w0 = spad[40:40 + r], spad[50:50 + r]
    acc = acc0.copy()
    rows1 = [1 + o * 10 + i * 2 for o in range(2) for i in range(3)]
    acc[3:9] = numerics.matmul(spad[rows1], w1)
    acc[8:14] = numerics.wrap_int32(acc[8:14].astype(np.int64)
                                    + numerics.matmul(spad[20:26], w1))
    acc[12:14] = numerics.wrap_int32(acc[12:14].astype(np.int64)
                                     + numerics.matmul(spad[30:32], w0))
    assert np.array_equal(out["acc"], acc)


def test_vector_unit_requantize_and_eltwise() -> None:
    cfg = small_config(vx_depth=3)
    rng = np.random.default_rng(3)
    c = cfg.cols
    spad = rng.integers(-128, 128, (cfg.spad_rows, c), dtype=np.int8)
    acc = rng.integers(-2**20, 2**20, (cfg.acc_rows, c), dtype=np.int32)
    acc[0] = rng.integers(-1000, 1000, c)                         # bias
    acc[1] = rng.integers(2**30, 2**31, c)                        # multiplier
    acc[2] = [0, 1, 31, 36][:c] + [20] * (c - 4)                  # shift (0: no rounding)
    # fp32 parameters at 13..15 (the shift row is ignored): float32 scales putting the products
    # around the int8 range, one negative, one with exponent field 255 (scale 0).
    scales = rng.uniform(0.5, 1.5, c) * 2.0**-14
    scales[0] = -scales[0]
    acc[14] = numerics.f32_bits(scales)
    acc[14, -1] = 0x7F800000 | int(rng.integers(0, 1 << 23))
    acc[15] = rng.integers(-2**31, 2**31, c)
    unit = VectorUnit(cfg)
    bench = UnitBench(cfg, unit, {"acc_r": ("acc", "r"), "spad_ra": ("spad", "r"),
                                  "spad_rb": ("spad", "r"), "spad_w": ("spad", "w")})
    vec = Instr(Opcode.VECTOR, 0, 0, dict(acc_addr=5, spad_addr=8, param_addr=0, n=4,
                                          zero_point=3, clamp_min=-100, clamp_max=90))
    vec_f = Instr(Opcode.VECTOR, 0, 0, dict(acc_addr=16, spad_addr=12, param_addr=13, n=5,
                                            zero_point=-5, clamp_min=-128, clamp_max=127,
                                            fp32=1))
    add = Instr(Opcode.ELTWISE, 0, 0, dict(
        func=0, a_addr=20, b_addr=40, shift=24, dst=20, a_stride_outer=3, b_stride_outer=5,
        n_inner=3, a_stride_inner=1, b_stride_inner=2, a_mult=6_000_001, b_mult=2**23 - 1,
        n_outer=2, a_zero=4, b_zero=-9, zero_point=-2, clamp_min=-128, clamp_max=127))
    mx = Instr(Opcode.ELTWISE, 0, 0, dict(
        func=1, a_addr=50, b_addr=55, shift=0, dst=60, a_stride_outer=0, b_stride_outer=0,
        n_inner=2, a_stride_inner=1, b_stride_inner=1, a_mult=0, b_mult=0, n_outer=1,
        a_zero=0, b_zero=0, zero_point=0, clamp_min=0, clamp_max=100))
    out = {}

    async def test(ctx):
        write_rows(ctx, bench.spad, spad)
        write_rows(ctx, bench.acc, acc)
        await run_back_to_back(ctx, cfg, [(unit.start, i, 0) for i in (vec, vec_f, add, mx)],
                               [unit.busy])
        out["spad"] = read_rows(ctx, bench.spad, "<i1")

    simulate(bench, test)
    exp = spad.copy()
    bias, mult, shift = (acc[k].astype(np.int64) for k in range(VECTOR_PARAM_ROWS))
    exp[8:12] = numerics.requantize(acc[5:9], bias, mult, shift, 3, -100, 90)
    # fp32 mode against numpy's float32 arithmetic directly.
    p = (acc[16:21].astype(np.int64) + acc[13]).astype(np.float32) * scales.astype(np.float32)
    p[:, -1] = 0
    exp[12:17] = np.clip(np.rint(p) - 5, -128, 127)
    assert np.unique(exp[12:17]).size > 8           # not all saturated
    a_rows = [20 + o * 3 + i for o in range(2) for i in range(3)]
    b_rows = [40 + o * 5 + i * 2 for o in range(2) for i in range(3)]
    exp[20:26] = numerics.eltwise_add(spad[a_rows], spad[b_rows], 4, -9, 6_000_001, 2**23 - 1,
                                      24, -2, -128, 127)
    assert np.unique(exp[20:26]).size > 8           # 23-bit multipliers, not all saturated
    exp[60:62] = numerics.eltwise_max(spad[50:52], spad[55:57], 0, 100)
    assert np.array_equal(out["spad"], exp)
