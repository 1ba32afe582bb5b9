"""cocotb testbench of the DMA engines: LD (``LoadUnit``: LOAD, GATHER) and ST (``StoreUnit``:
STORE) with SPAD, ACC and the DRAM model.

Driver: rounds of constrained-random LOAD / GATHER / STORE on random memories (DRAM of a random
size up to the model's, so accesses end at its last byte), started as the timing contract
allows: each unit at the earliest (``s = s_prev + busy``) or after a gap, and an instruction
that touches memory an instruction of the other unit writes (or reads) no earlier than that
one's completion (what tokens guarantee in a program). Some rounds end with a GATHER whose
index selects a row outside DRAM.

Monitors: the LD unit's SPAD/ACC write ports and the ST unit's DRAM write channel, every cycle.
Scoreboard (the reference interpreter's own semantic functions, applied in start order):
every memory write lies inside a started instruction's window (LD: ``[s, c - 1]``; a DRAM beat
sent at ``x`` lands at ``x + dram_latency``, so ``x <= c - dram_latency``), so every result is
in place by the instruction's completion; at the end of a round all of SPAD, ACC and DRAM hold
the model's values. A bad GATHER index raises ``fault`` with the GATHER's index and start cycle
before its completion, and nothing else ever raises it.
"""

from __future__ import annotations

from typing import Any

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge, Timer
from tbutil import (
    PERIOD_NS,
    bench_config,
    fail,
    finish_coverage,
    make_rng,
    pack,
    params,
    read_int,
    start,
    unpack,
)

from npu.coverage import Coverage
from npu.isa import Instr, Mem, NPUConfig, Opcode, address_error, timing
from npu.randprog import access_sets
from npu.runtime.reference import _exec_gather, _exec_load, _exec_store
from npu.runtime.result import NPUFault

OPS = ["LOAD spad", "LOAD acc", "LOAD fill", "GATHER spad", "GATHER acc", "STORE spad",
       "STORE acc"]


def coverage() -> Coverage:
    cov = Coverage("DMA engines")
    cov.point("op", OPS)
    cov.point("row bytes", ["1", "partial", "full row"])
    cov.cross("op x row bytes", ("op", "row bytes"))
    cov.point("address", ["unaligned DRAM address", "zero inner stride", "2-D",
                          "overlapping rows", "last DRAM byte", "last SPAD row",
                          "last ACC row"])
    cov.point("gather n", {"1": lambda n: n == 1, "2..max-1": lambda n: 1 < n < 16,
                           "max": lambda n: n == 16})
    cov.point("timing", ["LD back-to-back", "ST back-to-back", "LD and ST together",
                         "waits for the other unit"])
    cov.point("fault", ["negative index", "index past the end"])
    return cov


class Model:
    """SPAD, ACC and DRAM as numpy arrays; instructions applied with the reference
    interpreter's semantic functions."""

    def __init__(self, cfg: NPUConfig, rng: np.random.Generator, dram_bytes: int) -> None:
        self.spad = rng.integers(-128, 128, (cfg.spad_rows, cfg.cols)).astype(np.int8)
        self.acc = rng.integers(-(1 << 31), 1 << 31, (cfg.acc_rows, cfg.cols)).astype(np.int32)
        self.dram = rng.integers(0, 256, dram_bytes).astype(np.uint8)

    def apply(self, ins: Instr, cycle: int, index: int) -> None:
        if ins.opcode == Opcode.LOAD:
            _exec_load(ins.fields, self.dram, self.spad, self.acc)
        elif ins.opcode == Opcode.GATHER:
            _exec_gather(ins.fields, self.dram, self.spad, self.acc, cycle, index)
        else:
            _exec_store(ins.fields, self.dram, self.spad, self.acc)


def _row_bytes(rng: np.random.Generator, width: int) -> int:
    return int(rng.choice([1, width, int(rng.integers(2, width)) if width > 2 else width]))


def random_instr(rng: np.random.Generator, cfg: NPUConfig, model: Model, dram_bytes: int,
                 bad_gather: bool = False) -> Instr:
    """A legal LOAD, GATHER or STORE (GATHER: its index list is written into ``model.dram``;
    ``bad_gather``: one index selects a row outside DRAM)."""
    for _ in range(1000):
        op = Opcode.GATHER if bad_gather else Opcode(int(rng.choice(
            [Opcode.LOAD, Opcode.LOAD, Opcode.GATHER, Opcode.STORE, Opcode.STORE])))
        mem = int(rng.integers(0, 2))
        width = cfg.mem_row_bytes(mem)
        rows = cfg.mem_rows(mem)
        rb = _row_bytes(rng, width)
        near_end = rng.random() < 0.3
        if op == Opcode.GATHER:
            n = int(rng.choice([1, 16, int(rng.integers(2, 16))]))
            stride = int(rng.integers(rb, 3 * width))
            base = int(rng.integers(0, dram_bytes // 2))
            top = (dram_bytes - base - rb) // stride          # largest valid index
            if top < 0:
                continue
            idx = rng.integers(0, top + 1, n).astype(np.int64)
            if near_end:
                idx[int(rng.integers(0, n))] = top
            if bad_gather:
                idx[int(rng.integers(0, n))] = int(rng.choice([-1 - int(rng.integers(0, 5)),
                                                               top + 1 + int(rng.integers(0,
                                                                                          9))]))
            index_addr = int(rng.integers(0, dram_bytes - 4 * n + 1))
            f = dict(dram_addr=base, index_addr=index_addr, row_stride=stride,
                     dst=int(rng.integers(0, rows - n + 1)), n=n, row_bytes=rb, mem=mem)
            ins = Instr(op, 0, 0, f)
            if address_error(ins, cfg, dram_bytes) is None:
                model.dram[index_addr:index_addr + 4 * n] = idx.astype("<i4").view(np.uint8)
                return ins
            continue
        n_inner = int(rng.choice([1, int(rng.integers(2, 7))]))
        n_outer = int(rng.choice([1, 1, int(rng.integers(2, 4))]))
        si = int(rng.choice([0, rb, int(rng.integers(0, 3 * width))]))
        so = int(rng.integers(0, 4 * width * n_inner + 1))
        local_so = int(rng.integers(0, n_inner + 3))
        span = (n_outer - 1) * so + (n_inner - 1) * si + rb
        if span > dram_bytes:
            continue
        dram_addr = dram_bytes - span if near_end else int(rng.integers(0, dram_bytes - span + 1))
        lspan = (n_outer - 1) * local_so + n_inner
        if lspan > rows:
            continue
        local = rows - lspan if rng.random() < 0.2 else int(rng.integers(0, rows - lspan + 1))
        if op == Opcode.LOAD:
            fill = int(rng.random() < 0.2)
            f = dict(dram_addr=dram_addr, dram_stride_outer=so, dram_stride_inner=si,
                     dst=local, dst_stride_outer=local_so, n_inner=n_inner, n_outer=n_outer,
                     row_bytes=rb, mem=mem, fill=fill,
                     fill_value=int(rng.integers(-128, 128)) if fill else 0)
        else:
            f = dict(dram_addr=dram_addr, dram_stride_outer=so, dram_stride_inner=si, src=local,
                     src_stride_outer=local_so, n_inner=n_inner, n_outer=n_outer, row_bytes=rb,
                     mem=mem)
        ins = Instr(op, 0, 0, f)
        if address_error(ins, cfg, dram_bytes) is None:
            return ins
    raise AssertionError("could not draw a legal DMA instruction")


def _sample(cov: Coverage, cfg: NPUConfig, ins: Instr, dram_bytes: int) -> None:
    f = ins.fields
    mem = "acc" if f["mem"] == Mem.ACC else "spad"
    op = f"{ins.opcode.name} {mem}"
    if ins.opcode == Opcode.LOAD and f["fill"]:
        op = "LOAD fill"
    rb = f["row_bytes"]
    kind = "1" if rb == 1 else "full row" if rb == cfg.mem_row_bytes(f["mem"]) else "partial"
    cov.sample(op=op, **{"row bytes": kind})
    addr = cov.sample
    if f["dram_addr"] % cfg.dram_beat_bytes and not f.get("fill", 0):
        addr(address="unaligned DRAM address")
    if ins.opcode == Opcode.GATHER:
        cov.sample(**{"gather n": f["n"]})
        return
    if f["dram_stride_inner"] == 0 and f["n_inner"] > 1:
        addr(address="zero inner stride")
    if f["n_outer"] > 1:
        addr(address="2-D")
        local_so = f["dst_stride_outer"] if ins.opcode == Opcode.LOAD else f["src_stride_outer"]
        if local_so < f["n_inner"]:
            addr(address="overlapping rows")
    end = (f["dram_addr"] + (f["n_outer"] - 1) * f["dram_stride_outer"]
           + (f["n_inner"] - 1) * f["dram_stride_inner"] + rb)
    if end == dram_bytes and not f.get("fill", 0):
        addr(address="last DRAM byte")
    local = f["dst"] if ins.opcode == Opcode.LOAD else f["src"]
    local_so = f["dst_stride_outer"] if ins.opcode == Opcode.LOAD else f["src_stride_outer"]
    last = local + (f["n_outer"] - 1) * local_so + f["n_inner"]
    if last == cfg.mem_rows(f["mem"]):
        addr(address="last ACC row" if f["mem"] == Mem.ACC else "last SPAD row")


def _conflict(a: tuple, b: tuple) -> bool:
    (ra, wa), (rb, wb) = a, b
    return any(wa[s] & (wb[s] | rb[s]) or wb[s] & ra[s] for s in ("dram", "spad", "acc"))


async def _load_memories(dut: Any, cfg: NPUConfig, model: Model, state: dict[str, Any],
                         beat: int) -> None:
    """Write the model's memories into the design (only what differs from what it holds)."""
    for r in np.flatnonzero((state["spad"] != model.spad).any(axis=1)).tolist():
        dut.spad[r].value = pack(model.spad[r], 8)
    for r in np.flatnonzero((state["acc"] != model.acc).any(axis=1)).tolist():
        dut.acc[r].value = pack(model.acc[r], 32)
    d = state["dram"]
    lanes = [getattr(dut.dram, f"lane{j}") for j in range(beat)]
    for a in np.flatnonzero(d[:len(model.dram)] != model.dram).tolist():
        lanes[a % beat][a // beat].value = int(model.dram[a])
    await RisingEdge(dut.clk)


def _read_memories(dut: Any, cfg: NPUConfig, beat: int, dram_size: int) -> dict[str, Any]:
    spad = np.array([unpack(read_int(dut.spad[r]), cfg.cols, 8) for r in range(cfg.spad_rows)],
                    dtype=np.int64).astype(np.int8)
    acc = np.array([unpack(read_int(dut.acc[r]), cfg.cols, 32) for r in range(cfg.acc_rows)],
                   dtype=np.int64).astype(np.int32)
    lanes = [getattr(dut.dram, f"lane{j}") for j in range(beat)]
    dram = np.zeros(dram_size, dtype=np.uint8)
    for a in range(dram_size):
        dram[a] = read_int(lanes[a % beat][a // beat])
    return {"spad": spad, "acc": acc, "dram": dram}


@cocotb.test()
async def dma_random(dut: Any) -> None:
    """Constrained-random LOAD/GATHER/STORE rounds against the reference semantics."""
    p = params()
    cfg = bench_config(p)
    total, dram_size, beat = p.get("amount", 120), p["dram_size"], cfg.dram_beat_bytes
    lat = cfg.dram_latency
    rng = make_rng(dut._log)
    cov = coverage()
    for unit in ("ld", "st"):
        for port in ("valid", "word", "index", "cycle", "bank"):
            getattr(dut, f"{unit}_{port}").value = 0
    dut.dram_bytes.value = 0
    await start(dut)
    state = {"spad": np.zeros((cfg.spad_rows, cfg.cols), np.int8),
             "acc": np.zeros((cfg.acc_rows, cfg.cols), np.int32),
             "dram": np.zeros(dram_size, np.uint8)}
    errors: list[str] = []
    issued, t, round_no = 0, 0, 0
    # Past `total`, rounds go on (up to 4x) while the coverage has holes.
    while (issued < total or cov.missed()) and issued < 4 * total and len(errors) < 5:
        round_no += 1
        dram_bytes = int(rng.integers(dram_size // 2, dram_size + 1))
        model = Model(cfg, rng, dram_bytes)
        bad_round = round_no % 6 == 0
        plan: list[tuple[int, str, Instr, int, int]] = []   # (start, unit, instr, c, index)
        free = {"ld": 0, "st": 0}
        k_max = int(rng.integers(1, 7))
        instrs = []
        for k in range(k_max):
            bad = bad_round and k == k_max - 1
            ins = random_instr(rng, cfg, model, dram_bytes, bad_gather=bad)
            instrs.append((ins, bad))
        # Memories are loaded after drawing (GATHER index lists are in model.dram by now).
        model_dram0 = model.dram.copy()
        await _load_memories(dut, cfg, model, state, beat)
        dut.dram_bytes.value = dram_bytes
        await RisingEdge(dut.clk)
        t += 2
        t0 = t + 1
        sets = []
        for k, (ins, _bad) in enumerate(instrs):
            unit = "st" if ins.opcode == Opcode.STORE else "ld"
            tm = timing(ins, cfg)
            s = max(t0, free[unit])
            back = s == free[unit] and k > 0
            if rng.random() < 0.3:
                s += int(rng.integers(1, 8))
                back = False
            # GATHER: every table byte counts (a STORE may rewrite its indices first).
            acc_sets = access_sets(ins, cfg, None if ins.opcode == Opcode.GATHER
                                   else model_dram0, dram_bytes)
            waited = False
            for (_s2, u2, _i2, c2, _k2), st2 in zip(plan, sets):
                if u2 != unit and _conflict(st2, acc_sets) and s < c2:
                    s, waited = c2, True
            if waited:
                cov.sample(timing="waits for the other unit")
            if back:
                cov.sample(timing=f"{unit.upper()} back-to-back")
            plan.append((s, unit, ins, s + tm.latency, k))
            sets.append(acc_sets)
            free[unit] = s + tm.busy
            _sample(cov, cfg, ins, dram_bytes)
        ends = [c for _s, _u, _i, c, _k in plan]
        windows = {"ld": [(s, c) for s, u, _i, c, _k in plan if u == "ld"],
                   "st": [(s, c) for s, u, _i, c, _k in plan if u == "st"]}
        if any(s1 <= s2 < s1 + timing(i1, cfg).busy for s1, u1, i1, _c, _k in plan
               for s2, u2, _i2, _c2, _k2 in plan if u1 == "ld" and u2 == "st"):
            cov.sample(timing="LD and ST together")
        # The model, in start order (LD before ST on the same cycle, as the contract).
        fault_expected = None
        for s, _unit, ins, c, k in sorted(plan, key=lambda x: (x[0], x[1] != "ld")):
            try:
                model.apply(ins, s, k)
            except NPUFault:
                fault_expected = (k, s, c)
                idx = model.dram[ins.fields["index_addr"]:ins.fields["index_addr"]
                                 + 4 * ins.fields["n"]].view("<i4")
                cov.sample(fault="negative index" if (idx < 0).any() else "index past the end")
                break
        by_start = {s: (unit, ins, k) for s, unit, ins, c, k in plan}
        by_start_st = {s: (unit, ins, k) for s, unit, ins, c, k in plan if unit == "st"}
        by_start_ld = {s: (unit, ins, k) for s, unit, ins, c, k in plan if unit == "ld"}
        del by_start
        end = max(ends) + 2
        fault_seen = None
        while t <= end:
            for unit, table in (("ld", by_start_ld), ("st", by_start_st)):
                go = table.get(t)
                getattr(dut, f"{unit}_valid").value = int(go is not None)
                if go is not None:
                    _u, ins, k = go
                    getattr(dut, f"{unit}_word").value = int.from_bytes(ins.encode(), "little")
                    getattr(dut, f"{unit}_index").value = k
                    getattr(dut, f"{unit}_cycle").value = t
                    issued += 1
            await ReadOnly()
            for en, name in (("ld_spad_w_en", "SPAD"), ("ld_acc_w_en", "ACC")):
                if read_int(getattr(dut, en)) and not any(s <= t <= c - 1
                                                          for s, c in windows["ld"]):
                    errors.append(f"cycle {t}: LD wrote {name} outside every LD instruction's "
                                  f"[s, c-1]")
            if read_int(dut.dram_w_valid) and read_int(dut.dram_w_mask) and not any(
                    s <= t <= c - lat for s, c in windows["st"]):
                errors.append(f"cycle {t}: a DRAM write beat outside every STORE's "
                              f"[s, c - dram_latency]")
            if read_int(dut.fault_valid) and fault_seen is None:
                fault_seen = (read_int(dut.fault_index), read_int(dut.fault_cycle), t)
            await RisingEdge(dut.clk)
            t += 1
        for unit in ("ld", "st"):
            getattr(dut, f"{unit}_valid").value = 0
        if fault_expected is not None or fault_seen is not None:
            want = None if fault_expected is None else fault_expected[:2]
            got = None if fault_seen is None else fault_seen[:2]
            if want != got:
                errors.append(f"round {round_no}: GATHER fault (index, start cycle) expected "
                              f"{want}, got {got}")
            elif fault_seen[2] >= fault_expected[2]:
                errors.append(f"round {round_no}: GATHER fault raised at {fault_seen[2]}, not "
                              f"before its completion {fault_expected[2]}")
            # Stop the units and drain the pipelines; the memories are reloaded next round.
            dut.rst.value = 1
            await RisingEdge(dut.clk)
            await RisingEdge(dut.clk)
            dut.rst.value = 0
            await Timer(4 * (lat + cfg.rows + cfg.cols) * PERIOD_NS, unit="ns")
            await RisingEdge(dut.clk)
            t += 4 * (lat + cfg.rows + cfg.cols) + 3
            state = _read_memories(dut, cfg, beat, dram_size)
            continue
        state = _read_memories(dut, cfg, beat, dram_size)
        for name in ("spad", "acc"):
            bad = np.flatnonzero((state[name] != getattr(model, name)).any(axis=1))
            if bad.size:
                r = int(bad[0])
                errors.append(f"round {round_no}: {name.upper()} row {r} = "
                              f"{state[name][r].tolist()}, expected "
                              f"{getattr(model, name)[r].tolist()} ({bad.size} rows differ); "
                              f"instructions: {[str(i) for _s, _u, i, _c, _k in plan]}")
        bad = np.flatnonzero(state["dram"][:dram_bytes] != model.dram)
        if bad.size:
            a = int(bad[0])
            errors.append(f"round {round_no}: DRAM byte {a} = {state['dram'][a]}, expected "
                          f"{model.dram[a]} ({bad.size} bytes differ); instructions: "
                          f"{[str(i) for _s, _u, i, _c, _k in plan]}")
    for e in errors:
        dut._log.error(e)
    finish_coverage(cov, dut._log)
    if errors:
        raise fail(f"{len(errors)} DMA error(s); first: {errors[0]}")
