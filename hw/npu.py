"""The NPU top: instruction memory, control, the four engines' datapaths, SPAD and ACC.

Ports: a host side (instruction memory write port, ``start``, ``n_instr``, ``dram_bytes``,
``watchdog``, ``status``), the DRAM read and write channels, and a per-cycle ``trace`` of
dispatch/ready/start/retire events (for a simulation harness or a debug unit).

Memory ports (all synchronous, one cycle):

======  ===========================================  =====================================
memory  read ports                                   write ports
======  ===========================================  =====================================
SPAD    EX weights, EX inputs, VX a, VX b, ST        LD, VX
ACC     EX (transparent to EX writes), VX, ST        LD, EX
imem    control (transparent to host writes)         host
======  ===========================================  =====================================
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import MemoryData, Module
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from npu import isa
from npu.isa import NPUConfig, Unit

from .common import CYCLE_BITS, acc_row, index_bits, spad_row
from .control import Control, StatusLayout, TraceLayout
from .dma import LoadUnit, StoreUnit
from .dram import DRAM_ADDR_BITS, DRAMReadSignature, DRAMWriteSignature
from .execute import ExecuteEngine
from .vector import VectorUnit

__all__ = ["NPU"]


class NPU(wiring.Component):
    """The NPU of ``cfg`` (an :class:`npu.isa.NPUConfig`).

    ``imem_init`` optionally preloads the instruction memory (an ``(N, 4)`` uint64 array from
    :func:`npu.isa.encode_words`); ``spad``, ``acc`` and ``imem`` are the
    :class:`~amaranth.hdl.MemoryData` of the memories, which a simulation may read and write.
    ``debug`` adds host read ports ``dbg_spad`` and ``dbg_acc`` (one more read port on each
    memory) for testbenches that cannot reach the memories directly.
    """

    def __init__(self, cfg: NPUConfig, *, imem_init: Any = None, debug: bool = False) -> None:
        if not isinstance(cfg, NPUConfig):
            raise TypeError(f"NPU needs an NPUConfig, got {cfg!r}")
        self.cfg = cfg
        self.spad = MemoryData(shape=spad_row(cfg), depth=cfg.spad_rows, init=[])
        self.acc = MemoryData(shape=acc_row(cfg), depth=cfg.acc_rows, init=[])
        init = [] if imem_init is None else _words_to_ints(imem_init)
        if len(init) > cfg.imem_depth:
            raise ValueError(f"program of {len(init)} instructions exceeds imem_depth "
                             f"{cfg.imem_depth}")
        self.imem = MemoryData(shape=isa.INSTR_BITS, depth=cfg.imem_depth, init=init)
        self.debug = debug
        dbg = {}
        if debug:
            dbg = {"dbg_spad": Out(memory.ReadPort.Signature(
                       addr_width=ceil_log2(cfg.spad_rows), shape=spad_row(cfg))),
                   "dbg_acc": Out(memory.ReadPort.Signature(
                       addr_width=ceil_log2(cfg.acc_rows), shape=acc_row(cfg)))}
        super().__init__({
            **dbg,
            "imem_w": Out(memory.WritePort.Signature(addr_width=ceil_log2(cfg.imem_depth),
                                                     shape=isa.INSTR_BITS)),
            "start": In(1),
            "n_instr": In(index_bits(cfg)),
            "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "watchdog": In(CYCLE_BITS, init=min(cfg.watchdog_cycles, (1 << CYCLE_BITS) - 1)),
            "status": Out(StatusLayout(cfg)),
            "dram_r": Out(DRAMReadSignature(cfg)),
            "dram_w": Out(DRAMWriteSignature(cfg)),
            "trace": Out(TraceLayout(cfg)),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        cfg = self.cfg
        m.submodules.imem = imem = memory.Memory(data=self.imem)
        m.submodules.spad = spad = memory.Memory(data=self.spad)
        m.submodules.acc = acc = memory.Memory(data=self.acc)
        m.submodules.control = ctl = Control(cfg)
        m.submodules.ld = ld = LoadUnit(cfg)
        m.submodules.ex = ex = ExecuteEngine(cfg)
        m.submodules.vx = vx = VectorUnit(cfg)
        m.submodules.st = st = StoreUnit(cfg)

        host_w = imem.write_port()
        wiring.connect(m, wiring.flipped(self.imem_w), host_w)
        wiring.connect(m, ctl.imem, imem.read_port(transparent_for=(host_w,)))
        m.d.comb += [ctl.start.eq(self.start), ctl.n_instr.eq(self.n_instr),
                     ctl.dram_bytes.eq(self.dram_bytes), ctl.watchdog.eq(self.watchdog),
                     self.status.eq(ctl.status), self.trace.eq(ctl.trace),
                     ld.dram_bytes.eq(self.dram_bytes), ctl.gather_fault.eq(ld.fault),
                     ctl.gather_busy.eq(ld.gather_busy)]

        wiring.connect(m, ctl.unit_port(Unit.LD_DMA), ld.start)
        wiring.connect(m, ctl.unit_port(Unit.EX_WEIGHTS), ex.preload)
        wiring.connect(m, ctl.unit_port(Unit.EX_ARRAY), ex.matmul)
        wiring.connect(m, ctl.unit_port(Unit.VX), vx.start)
        wiring.connect(m, ctl.unit_port(Unit.ST_DMA), st.start)
        wiring.connect(m, wiring.flipped(self.dram_r), ld.dram)
        wiring.connect(m, wiring.flipped(self.dram_w), st.dram)

        acc_ex_w = acc.write_port()
        wiring.connect(m, ld.spad_w, spad.write_port())
        wiring.connect(m, ld.acc_w, acc.write_port())
        wiring.connect(m, ex.spad_r_weights, spad.read_port())
        wiring.connect(m, ex.spad_r_inputs, spad.read_port())
        wiring.connect(m, ex.acc_r, acc.read_port(transparent_for=(acc_ex_w,)))
        wiring.connect(m, ex.acc_w, acc_ex_w)
        wiring.connect(m, vx.acc_r, acc.read_port())
        wiring.connect(m, vx.spad_ra, spad.read_port())
        wiring.connect(m, vx.spad_rb, spad.read_port())
        wiring.connect(m, vx.spad_w, spad.write_port())
        wiring.connect(m, st.spad_r, spad.read_port())
        wiring.connect(m, st.acc_r, acc.read_port())
        if self.debug:
            wiring.connect(m, wiring.flipped(self.dbg_spad), spad.read_port())
            wiring.connect(m, wiring.flipped(self.dbg_acc), acc.read_port())
        return m


def _words_to_ints(words: Any) -> list[int]:
    """(N, 4) uint64 little-endian words -> N 256-bit integers."""
    import numpy as np

    arr = np.ascontiguousarray(words, dtype="<u8").reshape(-1, isa.INSTR_WORDS)
    return [int.from_bytes(row.tobytes(), "little") for row in arr]
