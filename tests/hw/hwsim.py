"""Helpers for the RTL unit tests: small configs, combinational evaluation, random instructions,
and a bench that surrounds one functional unit with SPAD, ACC and a DRAM model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from amaranth.hdl import MemoryData, Module, Value
from amaranth.lib import memory, wiring
from amaranth.sim import Simulator

from npu.hw.common import acc_row, spad_row
from npu.hw.dram import DRAMModel
from npu.isa import LAYOUTS, OPCODE_ENGINE, Engine, Instr, NPUConfig, Opcode, encode, get_config

HEADER = ("opcode", "wait", "signal")


def small_config(**changes: Any) -> NPUConfig:
    """npu4 with small memories (fast elaboration) and a short DRAM latency."""
    base = dict(spad_rows=64, acc_rows=32, imem_depth=16, dram_latency=5, gather_max=16)
    base.update(changes)
    return dataclasses.replace(get_config("npu4"), **base)


def word_of(instr: Instr) -> int:
    return int.from_bytes(encode(instr), "little")


def simulate(dut: Any, bench: Callable[[Any], Any], *, clock: bool = True) -> None:
    """Run an async testbench ``bench(ctx)`` against ``dut``."""
    sim = Simulator(dut)
    if clock:
        sim.add_clock(1e-8, if_exists=True)
    sim.add_testbench(bench)
    sim.run()


def comb_eval(dut: Any, cases: Iterable[list[tuple[Any, int]]], outputs: list[Any]
              ) -> list[list[int]]:
    """Set each case's ``(signal, value)`` inputs and read ``outputs`` (combinational logic)."""
    results: list[list[int]] = []
    cases = list(cases)

    async def bench(ctx: Any) -> None:
        for case in cases:
            for sig, value in case:
                ctx.set(sig, value)
            results.append([ctx.get(o) for o in outputs])

    simulate(dut, bench, clock=False)
    return results


def random_fields(rng: np.random.Generator, op: Opcode, cfg: NPUConfig) -> dict[str, int]:
    """Fields of ``op`` drawn to hit both legal and out-of-range addresses: small counts and
    strides near the memories' sizes, sometimes anywhere in the field's range."""
    out = {}
    for name, f in LAYOUTS[op].items():
        if name in HEADER:
            continue
        if name == "engine":
            out[name] = int(rng.integers(0, 4))
            continue
        r = rng.random()
        if r < 0.1:
            v = int(rng.integers(f.lo, f.hi + 1))
        elif r < 0.2:
            v = f.hi if rng.random() < 0.5 else f.lo
        elif name in ("n", "n_inner", "n_outer"):
            v = int(rng.integers(0, 6))
        elif name == "row_bytes":
            v = int(rng.integers(0, 4 * cfg.cols + 3))
        elif name in ("dram_addr", "index_addr"):
            v = int(rng.integers(0, 600))
        elif "stride" in name:
            v = int(rng.integers(0, 40))
        elif name in ("dst", "src", "spad_addr", "acc_addr", "param_addr", "a_addr", "b_addr"):
            v = int(rng.integers(0, 2 * cfg.spad_rows))
        else:
            v = int(rng.integers(f.lo, f.hi + 1))
        out[name] = min(max(v, f.lo), f.hi)
    if op == Opcode.ELTWISE and rng.random() < 0.4:     # aliasing destinations
        src = "a" if rng.random() < 0.5 else "b"
        f = LAYOUTS[op]["dst"]
        out["dst"] = min(max(out[f"{src}_addr"] + int(rng.integers(-1, 2)), 0), f.hi)
        if rng.random() < 0.5:
            out[f"{src}_stride_inner"], out[f"{src}_stride_outer"] = 1, out["n_inner"]
    return out


def random_instr(rng: np.random.Generator, cfg: NPUConfig, ops: list[Opcode] | None = None
                 ) -> Instr:
    op = Opcode(int(rng.choice([int(o) for o in (ops or list(Opcode))])))
    fields = random_fields(rng, op, cfg)
    engine = Engine(fields["engine"]) if op == Opcode.SYNC else OPCODE_ENGINE[op]
    wait = signal = 0
    if engine is not None:
        wait = int(rng.integers(0, 16)) & ~(1 << engine)
        signal = int(rng.integers(0, 16)) & ~(1 << engine)
    return Instr(op, wait, signal, fields)


# --------------------------------------------------------------------------------------------
# A unit between memories
# --------------------------------------------------------------------------------------------

class UnitBench(wiring.Component):
    """One functional unit with its own SPAD and ACC (and a DRAM model when it has DRAM ports).

    ``ports`` maps the unit's memory port names to ("spad"|"acc", "r"|"w"). The memories'
    :class:`MemoryData` are ``spad``/``acc``; ``dram`` is the DRAM model or None.
    """

    def __init__(self, cfg: NPUConfig, unit: Any, ports: dict[str, tuple[str, str]],
                 dram: bytes | np.ndarray | None = None, dram_size: int = 1024) -> None:
        self.cfg, self.unit, self.ports = cfg, unit, ports
        self.spad = MemoryData(shape=spad_row(cfg), depth=cfg.spad_rows, init=[])
        self.acc = MemoryData(shape=acc_row(cfg), depth=cfg.acc_rows, init=[])
        self.dram = DRAMModel(cfg, dram_size, init=dram) if dram is not None else None
        super().__init__({})

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        m.submodules.unit = unit = self.unit
        mems = {"spad": memory.Memory(data=self.spad), "acc": memory.Memory(data=self.acc)}
        m.submodules.spad, m.submodules.acc = mems["spad"], mems["acc"]
        writes = {}
        for name, (mem, kind) in self.ports.items():
            if kind == "w":
                writes[name] = mems[mem].write_port()
                wiring.connect(m, getattr(unit, name), writes[name])
        for name, (mem, kind) in self.ports.items():
            if kind == "r":
                # The EX unit reads ACC through a port transparent to its own writes.
                trans = tuple(w for n, w in writes.items() if self.ports[n][0] == mem
                              and n == "acc_w" and name == "acc_r")
                wiring.connect(m, getattr(unit, name), mems[mem].read_port(transparent_for=trans))
        if self.dram is not None:
            m.submodules.dram = self.dram
            if hasattr(unit, "dram"):
                if "req_valid" in unit.dram.signature.members:
                    wiring.connect(m, unit.dram, self.dram.rd)
                else:
                    wiring.connect(m, unit.dram, self.dram.wr)
        return m


def read_rows(ctx: Any, mem: MemoryData, dtype: str) -> np.ndarray:
    width = len(Value.cast(mem[0])) // 8
    raw = b"".join(ctx.get(Value.cast(mem[i])).to_bytes(width, "little")
                   for i in range(mem.depth))
    return np.frombuffer(raw, dtype=dtype).reshape(mem.depth, -1).copy()


def write_rows(ctx: Any, mem: MemoryData, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows)
    for i, row in enumerate(rows):
        ctx.set(Value.cast(mem[i]), int.from_bytes(row.tobytes(), "little"))


def read_dram(ctx: Any, dram: DRAMModel) -> np.ndarray:
    out = np.zeros(dram.size, dtype=np.uint8)
    for addr in range(dram.size):
        lane, row = dram.lane_row(addr)
        out[addr] = ctx.get(Value.cast(dram.lanes[lane][row]))
    return out


async def start_unit(ctx: Any, port: Any, instr: Instr, *, index: int = 0, cycle: int = 0,
                     bank: int = 0) -> None:
    """Assert ``port`` (a start stream) for one cycle with ``instr``."""
    ctx.set(port.valid, 1)
    ctx.set(port.payload.word, word_of(instr))
    ctx.set(port.payload.index, index)
    ctx.set(port.payload.cycle, cycle)
    ctx.set(port.payload.bank, bank)
    await ctx.tick()
    ctx.set(port.valid, 0)
