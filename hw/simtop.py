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
from amaranth.utils import ceil_log2

from npu import isa
from npu.isa import Engine, Fault, NPUConfig

from .common import CYCLE_BITS, acc_row, index_bits, spad_row
from .control import StatusLayout
from .dram import DRAM_ADDR_BITS, DRAMModel
from .npu import NPU

__all__ = ["NPUSimTop", "HWResult", "Session", "session", "run", "TRACE_EVENTS", "NEVER"]

#: Per-instruction trace memories, each holding a cycle number. They start at zero (no
#: initial contents to emit for a 64K-deep memory); a testbench writes :data:`NEVER` into the
#: entries of a program before starting it, so that "never got there" reads as NEVER.
TRACE_EVENTS = ("dispatch", "ready", "start", "complete", "retire")
NEVER = (1 << CYCLE_BITS) - 1


class NPUSimTop(wiring.Component):
    """NPU + DRAM model + trace memories.

    ``program`` is an ``(N, 4)`` uint64 instruction array, ``dram`` the initial DRAM bytes;
    ``dram_size`` (default: the next power of two holding ``dram``, at least 4 KiB) sizes the
    model; ``trace_depth`` (default ``imem_depth``) is how many instructions the trace records.
    """

    def __init__(self, cfg: NPUConfig, *, program: Any = None, dram: Any = None,
                 dram_size: int | None = None, trace_depth: int | None = None) -> None:
        self.cfg = cfg
        dram_len = 0 if dram is None else len(bytes(dram) if not isinstance(dram, np.ndarray)
                                              else dram.ravel())
        if dram_size is None:
            dram_size = max(4096, cfg.dram_beat_bytes, 1 << max(dram_len - 1, 1).bit_length())
        self.npu = NPU(cfg, imem_init=program, debug=True)
        self.dram = DRAMModel(cfg, dram_size, init=dram)
        self.trace_depth = max(2, trace_depth if trace_depth is not None else cfg.imem_depth)
        self.traces = {ev: MemoryData(shape=CYCLE_BITS, depth=self.trace_depth, init=[])
                       for ev in TRACE_EVENTS}
        iw = ceil_log2(self.trace_depth)
        super().__init__({
            "start": In(1),
            "n_instr": In(index_bits(cfg)),
            "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "watchdog": In(CYCLE_BITS, init=min(cfg.watchdog_cycles, NEVER)),
            "status": Out(StatusLayout(cfg)),
            # Host ports for testbenches that load and read through pins (cocotb/Verilator):
            # instruction memory writes, DRAM by aligned beat, SPAD/ACC and trace reads (data
            # one cycle after the address).
            "imem_w": Out(memory.WritePort.Signature(addr_width=ceil_log2(cfg.imem_depth),
                                                     shape=isa.INSTR_BITS)),
            "dram_host": self.dram.signature.members["host"],
            "dbg_spad": Out(memory.ReadPort.Signature(addr_width=ceil_log2(cfg.spad_rows),
                                                      shape=spad_row(cfg))),
            "dbg_acc": Out(memory.ReadPort.Signature(addr_width=ceil_log2(cfg.acc_rows),
                                                     shape=acc_row(cfg))),
            "trace_r": Out(wiring.Signature({
                "addr": In(iw),
                **{ev: Out(CYCLE_BITS) for ev in TRACE_EVENTS}})),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        m.submodules.npu = npu = self.npu
        m.submodules.dram = dram = self.dram
        wiring.connect(m, npu.dram_r, dram.rd)
        wiring.connect(m, npu.dram_w, dram.wr)
        wiring.connect(m, wiring.flipped(self.imem_w), npu.imem_w)
        wiring.connect(m, wiring.flipped(self.dram_host), dram.host)
        wiring.connect(m, wiring.flipped(self.dbg_spad), npu.dbg_spad)
        wiring.connect(m, wiring.flipped(self.dbg_acc), npu.dbg_acc)
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
            rd = mem.read_port()
            m.d.comb += [rd.addr.eq(self.trace_r.addr), getattr(self.trace_r, ev).eq(rd.data)]
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


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


class Session:
    """A compiled :class:`NPUSimTop` that runs many programs (one Amaranth simulator, reset
    between runs, memories loaded by the testbench), so that elaboration and simulator
    compilation are paid once per configuration and size.

    ``imem_depth`` (default the config's) and ``trace_depth`` bound the program length,
    ``dram_size`` the DRAM image.
    """

    def __init__(self, cfg: NPUConfig, *, imem_depth: int | None = None,
                 dram_size: int = 4096, trace_depth: int | None = None) -> None:
        if imem_depth is not None and imem_depth != cfg.imem_depth:
            cfg = dataclasses.replace(cfg, imem_depth=imem_depth)
        self.cfg = cfg
        self.top = NPUSimTop(cfg, dram_size=dram_size,
                             trace_depth=trace_depth if trace_depth is not None
                             else cfg.imem_depth)
        self.sim = Simulator(self.top)
        self.sim.add_clock(1e-8)
        self.sim.add_testbench(self._bench)
        self._job: dict[str, Any] | None = None
        self._out: dict[str, Any] = {}
        self._fresh = True

    def run(self, program: Any, dram: Any = b"", *, dram_bytes: int | None = None,
            watchdog: int | None = None, max_cycles: int = 1_000_000,
            read_memories: bool = True, vcd: str | None = None) -> HWResult:
        """Run one program; see :func:`run`."""
        words = np.asarray(program, dtype=np.uint64).reshape(-1, 4)
        image = np.frombuffer(bytes(dram), dtype=np.uint8) if not isinstance(dram, np.ndarray) \
            else np.asarray(dram, dtype=np.uint8).ravel()
        if len(words) > min(self.cfg.imem_depth, self.top.trace_depth):
            raise ValueError(f"program of {len(words)} instructions exceeds this session's "
                             f"imem/trace depth {min(self.cfg.imem_depth, self.top.trace_depth)}")
        if len(image) > self.top.dram.size:
            raise ValueError(f"DRAM image of {len(image)} bytes exceeds the model's "
                             f"{self.top.dram.size}")
        self._job = {"words": words, "image": image, "max_cycles": max_cycles,
                     "dram_bytes": len(image) if dram_bytes is None else dram_bytes,
                     "watchdog": watchdog, "read": read_memories}
        self._out = {}
        if not self._fresh:
            self.sim.reset()
        self._fresh = False
        if vcd:
            with self.sim.write_vcd(vcd):
                self.sim.run()
        else:
            self.sim.run()
        out = self._out
        st = out["status"]
        empty = np.zeros(0)
        return HWResult(done=bool(st.done), cycles=int(st.cycles), fault=Fault(int(st.code)),
                        fault_cycle=int(st.fault_cycle), fault_index=int(st.fault_index),
                        spad=out.get("spad", empty), acc=out.get("acc", empty),
                        dram=out.get("dram", empty), trace=out["trace"], sim_cycles=out["n"])

    async def _bench(self, ctx: Any) -> None:
        job, top = self._job, self.top
        if job is None:
            return
        words, image = job["words"], job["image"]
        for i, row in enumerate(words):
            ctx.set(Value.cast(top.npu.imem[i]), int.from_bytes(row.astype("<u8").tobytes(),
                                                                "little"))
        for addr in np.flatnonzero(image).tolist():
            lane, row = top.dram.lane_row(addr)
            ctx.set(Value.cast(top.dram.lanes[lane][row]), int(image[addr]))
        for mem in top.traces.values():
            for i in range(len(words)):
                ctx.set(Value.cast(mem[i]), NEVER)
        ctx.set(top.n_instr, len(words))
        ctx.set(top.dram_bytes, job["dram_bytes"])
        if job["watchdog"] is not None:
            ctx.set(top.watchdog, job["watchdog"])
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
            if n > job["max_cycles"]:
                raise RuntimeError(f"NPUSimTop did not finish within {job['max_cycles']} "
                                   f"cycles")
        out = self._out
        out["status"], out["n"] = st, n
        cfg = self.cfg
        if job["read"]:
            out["spad"] = _rows(ctx, top.npu.spad, "<i1", cfg.spad_rows)
            out["acc"] = _rows(ctx, top.npu.acc, "<i4", cfg.acc_rows)
            lanes = [np.array([ctx.get(Value.cast(lane[r])) for r in range(lane.depth)],
                              dtype=np.uint8) for lane in top.dram.lanes]
            out["dram"] = np.stack(lanes, axis=1).ravel()
        traces = {}
        for ev, mem in top.traces.items():
            vals = np.array([ctx.get(Value.cast(mem[i])) for i in range(len(words))],
                            dtype=np.int64)
            traces[ev] = np.where(vals == NEVER, -1, vals)
        out["trace"] = traces


_SESSIONS: dict[tuple, Session] = {}


def session(cfg: NPUConfig, n_instructions: int, dram_bytes: int) -> Session:
    """A cached :class:`Session` large enough for the program (sizes rounded up to powers of
    two, so that similar programs share one compiled simulator)."""
    imem = min(cfg.imem_depth, _pow2(n_instructions + 1, 64))
    key = (cfg, imem, _pow2(dram_bytes, 4096))
    if key not in _SESSIONS:
        if len(_SESSIONS) >= 4:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = Session(cfg, imem_depth=imem, dram_size=key[2], trace_depth=imem)
    return _SESSIONS[key]


def run(cfg: NPUConfig, program: Any, dram: Any = b"", *, dram_bytes: int | None = None,
        watchdog: int | None = None, max_cycles: int = 1_000_000, read_memories: bool = True,
        vcd: str | None = None) -> HWResult:
    """Run ``program`` (``(N, 4)`` uint64 words) on :class:`NPUSimTop` under Amaranth's simulator.

    ``dram`` is the initial DRAM image; ``dram_bytes`` the DRAM size the program may address
    (default ``len(dram)``; faults are checked against it); ``watchdog`` the cycle limit (default
    the config's). ``max_cycles`` bounds the simulation itself (a RuntimeError beyond it).
    The instruction memory is sized to the program (a power of two above its length), which
    changes nothing but simulation speed; compiled simulators are cached per size.
    """
    words = np.asarray(program, dtype=np.uint64).reshape(-1, 4)
    size = len(dram) if not isinstance(dram, np.ndarray) else dram.size
    sess = session(cfg, len(words), max(size, dram_bytes or 0))
    return sess.run(words, dram, dram_bytes=dram_bytes, watchdog=watchdog,
                    max_cycles=max_cycles, read_memories=read_memories, vcd=vcd)
