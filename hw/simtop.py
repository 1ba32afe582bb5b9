"""Simulation top: the NPU, a DRAM model with the contract's latency and beat width, and trace
memories recording every instruction's dispatch, ready, start, completion and retire cycles.

A whole program runs inside the HDL simulator with no Python in the per-cycle loop:
:func:`run` builds an :class:`NPUSimTop` with the program and DRAM image as memory contents,
pulses ``start``, waits for done or fault and reads the memories, the cycle count, the fault
record and the trace back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from amaranth.hdl import MemoryData, Module, Value
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from npu.isa import Engine, Fault, NPUConfig

from .common import CYCLE_BITS, index_bits
from .control import StatusLayout
from .dram import DRAM_ADDR_BITS, DRAMModel
from .npu import NPU

__all__ = ["NPUSimTop", "HWResult", "run", "TRACE_EVENTS"]

#: Per-instruction trace memories; "never" reads as -1 in :class:`HWResult`.
TRACE_EVENTS = ("dispatch", "ready", "start", "complete", "retire")
_NEVER = (1 << CYCLE_BITS) - 1


class NPUSimTop(wiring.Component):
    """NPU + DRAM model + trace memories.

    ``program`` is an ``(N, 4)`` uint64 instruction array, ``dram`` the initial DRAM bytes;
    ``dram_size`` (default: the next power of two holding ``dram``, at least 4 KiB) sizes the
    model; ``trace_depth`` (default ``N``) is how many instructions the trace records.
    """

    def __init__(self, cfg: NPUConfig, *, program: Any = None, dram: Any = None,
                 dram_size: int | None = None, trace_depth: int | None = None) -> None:
        self.cfg = cfg
        n = 0 if program is None else int(np.asarray(program).reshape(-1, 4).shape[0])
        dram_len = 0 if dram is None else len(bytes(dram) if not isinstance(dram, np.ndarray)
                                              else dram.ravel())
        if dram_size is None:
            dram_size = max(4096, cfg.dram_beat_bytes, 1 << max(dram_len - 1, 1).bit_length())
        self.npu = NPU(cfg, imem_init=program)
        self.dram = DRAMModel(cfg, dram_size, init=dram)
        self.trace_depth = max(1, trace_depth if trace_depth is not None else n)
        self.traces = {ev: MemoryData(shape=CYCLE_BITS, depth=self.trace_depth,
                                      init=[_NEVER] * self.trace_depth) for ev in TRACE_EVENTS}
        super().__init__({
            "start": In(1),
            "n_instr": In(index_bits(cfg)),
            "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "watchdog": In(CYCLE_BITS, init=min(cfg.watchdog_cycles, _NEVER)),
            "status": Out(StatusLayout(cfg)),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        m.submodules.npu = npu = self.npu
        m.submodules.dram = dram = self.dram
        wiring.connect(m, npu.dram_r, dram.rd)
        wiring.connect(m, npu.dram_w, dram.wr)
        m.d.comb += [npu.start.eq(self.start), npu.n_instr.eq(self.n_instr),
                     npu.dram_bytes.eq(self.dram_bytes), npu.watchdog.eq(self.watchdog),
                     self.status.eq(npu.status)]
        tr = npu.trace
        # BARRIER and HALT are recorded as the reference does: s = d, c = r = d + 1.
        sync_pt = (tr.dispatch.valid & tr.dispatch.barrier, tr.dispatch.index)
        events: dict[str, list[tuple[Value, Value, Value]]] = {
            "dispatch": [(tr.dispatch.valid, tr.dispatch.index, tr.cycle)],
            "ready": [(tr.ready[e].valid, tr.ready[e].index, tr.cycle) for e in Engine]
            + [(*sync_pt, tr.cycle)],
            "start": [(tr.start[e].valid, tr.start[e].index, tr.cycle) for e in Engine]
            + [(*sync_pt, tr.cycle)],
            "complete": [(tr.start[e].valid, tr.start[e].index, tr.start[e].complete)
                         for e in Engine] + [(*sync_pt, tr.cycle + 1)],
            "retire": [(tr.retire[e].valid, tr.retire[e].index, tr.cycle) for e in Engine]
            + [(*sync_pt, tr.cycle + 1)],
        }
        for ev, sources in events.items():
            m.submodules[f"trace_{ev}"] = mem = memory.Memory(data=self.traces[ev])
            for valid, index, value in sources:
                port = mem.write_port()
                m.d.comb += [port.en.eq(valid & (index < self.trace_depth)),
                             port.addr.eq(index), port.data.eq(value)]
        return m


@dataclass
class HWResult:
    """Outcome of :func:`run`: the status register, memories and per-instruction trace."""

    done: bool
    cycles: int
    fault: Fault
    fault_cycle: int
    fault_index: int
    spad: np.ndarray             # int8 [spad_rows, cols]
    acc: np.ndarray              # int32 [acc_rows, cols]
    dram: np.ndarray             # uint8 [dram_size]
    trace: dict[str, np.ndarray]  # TRACE_EVENTS -> int64 [trace_depth], -1 = never
    sim_cycles: int              # clock cycles simulated (start pulse included)

    def fault_key(self) -> tuple[int, int, int] | None:
        """(code, cycle, index) as ``NPUFault.key()``, or None when the program ended."""
        if self.fault == Fault.NONE:
            return None
        return int(self.fault), self.fault_cycle, self.fault_index


def _rows(ctx: Any, mem: MemoryData, dtype: str, n: int) -> np.ndarray:
    width = len(Value.cast(mem[0])) // 8
    raw = b"".join(ctx.get(Value.cast(mem[i])).to_bytes(width, "little") for i in range(n))
    return np.frombuffer(raw, dtype=dtype).reshape(n, -1).copy()


def run(cfg: NPUConfig, program: Any, dram: Any = b"", *, dram_bytes: int | None = None,
        dram_size: int | None = None, watchdog: int | None = None, max_cycles: int = 1_000_000,
        read_memories: bool = True, small_imem: bool = True, vcd: str | None = None
        ) -> HWResult:
    """Run ``program`` (``(N, 4)`` uint64 words) on :class:`NPUSimTop` under Amaranth's simulator.

    ``dram`` is the initial DRAM image; ``dram_bytes`` the DRAM size the program may address
    (default ``len(dram)``; faults are checked against it); ``watchdog`` the cycle limit (default
    the config's). ``small_imem`` shrinks the instruction memory to the program (a power of two
    above its length), which speeds up simulation and changes nothing else. ``max_cycles``
    bounds the simulation itself (a RuntimeError beyond it).
    """
    words = np.asarray(program, dtype=np.uint64).reshape(-1, 4)
    if small_imem:
        depth = max(16, 1 << len(words).bit_length())
        if depth < cfg.imem_depth:
            cfg = dataclasses.replace(cfg, imem_depth=depth)
    image = np.frombuffer(bytes(dram), dtype=np.uint8) if not isinstance(dram, np.ndarray) \
        else np.asarray(dram, dtype=np.uint8).ravel()
    dram_bytes = len(image) if dram_bytes is None else dram_bytes
    top = NPUSimTop(cfg, program=words, dram=image, dram_size=dram_size)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    out: dict[str, Any] = {}

    async def testbench(ctx: Any) -> None:
        ctx.set(top.n_instr, len(words))
        ctx.set(top.dram_bytes, dram_bytes)
        if watchdog is not None:
            ctx.set(top.watchdog, watchdog)
        ctx.set(top.start, 1)
        await ctx.tick()
        ctx.set(top.start, 0)
        n = 1
        while True:
            # Chunks keep the simulator in its own loop; the status is sticky once set.
            await ctx.tick().repeat(64)
            n += 64
            st = ctx.get(top.status)
            if st.done or st.fault:
                break
            if n > max_cycles:
                raise RuntimeError(f"NPUSimTop did not finish within {max_cycles} cycles")
        out["status"] = st
        out["n"] = n
        if read_memories:
            out["spad"] = _rows(ctx, top.npu.spad, "<i1", cfg.spad_rows)
            out["acc"] = _rows(ctx, top.npu.acc, "<i4", cfg.acc_rows)
            lanes = [np.array([ctx.get(Value.cast(lane[r])) for r in range(lane.depth)],
                              dtype=np.uint8) for lane in top.dram.lanes]
            out["dram"] = np.stack(lanes, axis=1).ravel()
        traces = {}
        for ev, mem in top.traces.items():
            vals = np.array([ctx.get(Value.cast(mem[i])) for i in range(top.trace_depth)],
                            dtype=np.int64)
            traces[ev] = np.where(vals == _NEVER, -1, vals)
        out["trace"] = traces

    sim.add_testbench(testbench)
    if vcd:
        with sim.write_vcd(vcd):
            sim.run()
    else:
        sim.run()
    st = out["status"]
    empty = np.zeros(0)
    return HWResult(done=bool(st.done), cycles=int(st.cycles), fault=Fault(int(st.code)),
                    fault_cycle=int(st.fault_cycle), fault_index=int(st.fault_index),
                    spad=out.get("spad", empty), acc=out.get("acc", empty),
                    dram=out.get("dram", empty), trace=out["trace"], sim_cycles=out["n"])
