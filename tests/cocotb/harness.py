"""Verilog harnesses around the NPU's blocks for the cocotb block testbenches, and their builds.

Each harness instantiates one block of ``npu.hw`` (with the memories it talks to) and exposes
the block's ports as flat Verilog ports: structures are split into one port per field
(``start_valid``, ``start_payload_word``, ...), arrays of scalars stay packed (``x`` holds the
``rows`` int8 lanes, lane 0 in the low bits). Memories are reached by the testbenches through
the simulator (``dut.spad[i]``).

:func:`build` compiles a harness with :func:`npu.verify.build_design`, keyed by the hash of
``npu.hw``, the ISA, this file and the config, so a block is rebuilt only when it changed.

Block config (:data:`BLOCK_CONFIG`): npu4's array, DRAM timing and vector pipeline with small
memories (faster builds, and addresses hit the memory ends often); the control harness uses
:data:`CONTROL_CONFIG`, with short queues and a small ``token_max`` so that queue-full,
retire-depth and token-overflow conditions come quickly.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from amaranth.back import verilog as amaranth_verilog
from amaranth.hdl import Module, Signal, Value
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from npu.hw.array import SystolicArray
from npu.hw.common import acc_row, spad_row
from npu.hw.control import Control
from npu.hw.dma import LoadUnit, StoreUnit
from npu.hw.dram import DRAMModel
from npu.hw.vector import VectorUnit
from npu.isa import INSTR_BITS, NPUConfig, Opcode, Unit, get_config
from npu.verify import Build, _source_hash, build_design

__all__ = ["BLOCK_CONFIG", "CONTROL_CONFIG", "HARNESSES", "build", "DRAM_SIZE"]

BLOCK_CONFIG = dataclasses.replace(get_config("npu4"), name="npu4blk", spad_rows=128,
                                   acc_rows=64, gather_max=16, imem_depth=256)
CONTROL_CONFIG = dataclasses.replace(get_config("npu4"), name="npu4ctl", spad_rows=128,
                                     acc_rows=64, queue_depth=3, retire_depth=6,
                                     token_max=31, gather_max=16, imem_depth=512)
#: Bytes of the DMA harness's DRAM model.
DRAM_SIZE = 4096


def _leaves(value: Any, name: str) -> list[tuple[str, Value]]:
    """Flat (name, value) ports of a port value: structures split by field, scalar arrays
    packed."""
    if isinstance(value, data.View):
        layout = value.shape()
        if isinstance(layout, data.ArrayLayout):
            if not isinstance(layout.elem_shape, data.Layout):
                return [(name, Value.cast(value))]
            return [leaf for i in range(layout.length) for leaf in _leaves(value[i],
                                                                          f"{name}_{i}")]
        return [leaf for fname, _f in layout for leaf in _leaves(value[fname],
                                                                 f"{name}_{fname}")]
    return [(name, Value.cast(value))]


class Flat(wiring.Component):
    """A harness: ``build_inner(m)`` (called in ``elaborate``) returns nothing; the ports listed
    in ``exposed`` as ``(prefix, value, "in"|"out")`` are flattened onto this component."""

    def __init__(self, exposed: list[tuple[str, Any, str]], body: Any) -> None:
        self._exposed = exposed
        self._body = body
        members: dict[str, Any] = {}
        self._map: list[tuple[str, Value, str]] = []
        for prefix, value, direction in exposed:
            for name, leaf in _leaves(value, prefix):
                members[name] = (In if direction == "in" else Out)(leaf.shape())
                self._map.append((name, leaf, direction))
        super().__init__(members)

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        self._body(m)
        for name, leaf, direction in self._map:
            port = getattr(self, name)
            m.d.comb += (leaf.eq(port) if direction == "in" else port.eq(leaf))
        return m


def _start_ports(prefix: str, port: Any) -> list[tuple[str, Any, str]]:
    """A unit's start stream (valid + payload), driven by the testbench."""
    return [(f"{prefix}_valid", port.valid, "in"), (f"{prefix}", port.payload, "in")]


def array_harness(cfg: NPUConfig) -> Flat:
    """The systolic array alone: x, sel, weights in; y out."""
    arr = SystolicArray(cfg)

    def body(m: Module) -> None:
        m.submodules.array = arr

    return Flat([("x", arr.x, "in"), ("sel", arr.sel, "in"), ("w", arr.weights, "in"),
                 ("y", arr.y, "out")], body)


def _local_memories(cfg: NPUConfig) -> tuple[memory.Memory, memory.Memory]:
    """Empty SPAD and ACC memories of ``cfg``'s sizes (the benches fill them through VPI)."""
    return (memory.Memory(shape=spad_row(cfg), depth=cfg.spad_rows, init=[]),
            memory.Memory(shape=acc_row(cfg), depth=cfg.acc_rows, init=[]))


def vector_harness(cfg: NPUConfig) -> Flat:
    """The vector unit with SPAD and ACC memories (``spad``, ``acc``) and its SPAD write port
    observable."""
    vx = VectorUnit(cfg)
    spad, acc = _local_memories(cfg)

    def body(m: Module) -> None:
        m.submodules.vx = vx
        m.submodules.spad = spad
        m.submodules.acc = acc
        wiring.connect(m, vx.acc_r, acc.read_port())
        wiring.connect(m, vx.spad_ra, spad.read_port())
        wiring.connect(m, vx.spad_rb, spad.read_port())
        wiring.connect(m, vx.spad_w, spad.write_port())

    return Flat([*_start_ports("start", vx.start), ("busy", vx.busy, "out"),
                 ("spad_w_en", vx.spad_w.en, "out"), ("spad_w_addr", vx.spad_w.addr, "out")],
                body)


def dma_harness(cfg: NPUConfig) -> Flat:
    """LD and ST units with SPAD, ACC and the DRAM model (``dram.lane<j>``); the units'
    memory-write and DRAM-write activity is observable."""
    ld, st = LoadUnit(cfg), StoreUnit(cfg)
    dram = DRAMModel(cfg, DRAM_SIZE)
    spad, acc = _local_memories(cfg)

    def body(m: Module) -> None:
        m.submodules.ld = ld
        m.submodules.st = st
        m.submodules.dram = dram
        m.submodules.spad = spad
        m.submodules.acc = acc
        wiring.connect(m, ld.dram, dram.rd)
        wiring.connect(m, st.dram, dram.wr)
        wiring.connect(m, ld.spad_w, spad.write_port())
        wiring.connect(m, ld.acc_w, acc.write_port())
        wiring.connect(m, st.spad_r, spad.read_port())
        wiring.connect(m, st.acc_r, acc.read_port())

    return Flat([*_start_ports("ld", ld.start), *_start_ports("st", st.start),
                 ("dram_bytes", ld.dram_bytes, "in"),
                 ("ld_busy", ld.busy, "out"), ("st_busy", st.busy, "out"),
                 ("fault", ld.fault, "out"),
                 ("ld_spad_w_en", ld.spad_w.en, "out"), ("ld_spad_w_addr", ld.spad_w.addr, "out"),
                 ("ld_acc_w_en", ld.acc_w.en, "out"), ("ld_acc_w_addr", ld.acc_w.addr, "out"),
                 ("dram_w_valid", st.dram.valid, "out"), ("dram_w_addr", st.dram.addr, "out"),
                 ("dram_w_mask", st.dram.mask, "out")], body)


def control_harness(cfg: NPUConfig) -> Flat:
    """The control (dispatcher, queues, tokens, retirement, faults) with its instruction memory
    (``imem``); every unit's start port, the trace and the status are outputs; the LD unit's
    GATHER fault and ``gather_busy`` are played by the testbench."""
    ctl = Control(cfg)
    from amaranth.utils import ceil_log2

    imem = memory.Memory(shape=INSTR_BITS, depth=cfg.imem_depth, init=[])
    units = [u for u in Unit if u != Unit.NONE]

    # The LD unit's gather_busy: high from a GATHER's start cycle (combinationally, from the
    # start port, as in the LD unit) and then while the testbench holds it.
    gather_hold = Signal()
    ld = ctl.unit_port(Unit.LD_DMA)

    def body(m: Module) -> None:
        m.submodules.control = ctl
        m.submodules.imem = imem
        wiring.connect(m, ctl.imem, imem.read_port())
        starting = ld.valid & (ld.payload.word[:4] == int(Opcode.GATHER))
        m.d.comb += ctl.gather_busy.eq(gather_hold | starting)

    assert ceil_log2(cfg.imem_depth) > 0
    exposed: list[tuple[str, Any, str]] = [
        ("start", ctl.start, "in"), ("n_instr", ctl.n_instr, "in"),
        ("dram_bytes", ctl.dram_bytes, "in"), ("watchdog", ctl.watchdog, "in"),
        ("gather_fault", ctl.gather_fault, "in"), ("gather_hold", gather_hold, "in"),
        ("status", ctl.status, "out"), ("trace", ctl.trace, "out")]
    for u in units:
        port = ctl.unit_port(u)
        name = u.name.lower()
        exposed += [(f"u_{name}_valid", port.valid, "out"),
                    (f"u_{name}_index", port.payload.index, "out"),
                    (f"u_{name}_cycle", port.payload.cycle, "out"),
                    (f"u_{name}_bank", port.payload.bank, "out")]
    return Flat(exposed, body)


#: Block name -> (harness factory, config).
HARNESSES: dict[str, tuple[Any, NPUConfig]] = {
    "array": (array_harness, BLOCK_CONFIG),
    "vector": (vector_harness, BLOCK_CONFIG),
    "dma": (dma_harness, BLOCK_CONFIG),
    "control": (control_harness, CONTROL_CONFIG),
}


def build(block: str, sim: str = "verilator") -> tuple[Build, NPUConfig]:
    """The compiled harness of ``block`` (built on first use, then cached) and its config."""
    factory, cfg = HARNESSES[block]
    top = f"tb_{block}"
    here = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def source() -> str:
        return amaranth_verilog.convert(factory(cfg), name=top, emit_src=False)

    key = f"block|{block}|{_source_hash()}|{here}|{cfg.to_json()}"
    return build_design(source, top, key, sim=sim, name=f"block-{block}"), cfg
