"""DRAM ports of the NPU and a cycle-exact DRAM model for simulation.

The NPU has a read channel and a write channel, each moving one beat of
``cfg.dram_beat_bytes`` bytes per cycle at any byte address:

* read: a request (``req_valid``, ``req_addr``) at cycle ``t`` returns ``resp_data`` (byte ``k`` =
  DRAM[addr + k]) with ``resp_valid`` at cycle ``t + dram_latency``;
* write: a beat (``valid``, ``addr``, ``data``, ``mask``) at cycle ``t`` is in DRAM for reads
  issued from ``t + dram_latency`` on (its write acknowledge), the contract's latency.

:class:`DRAMModel` implements exactly that with one byte-wide memory per beat lane, so that an
unaligned beat touches each lane once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from amaranth.hdl import Const, MemoryData, Module, Mux, Signal, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from npu.isa import NPUConfig

from .common import DelayLine

__all__ = ["DRAM_ADDR_BITS", "DRAMReadSignature", "DRAMWriteSignature", "DRAMModel"]

#: DRAM byte addresses are 32-bit (as the ISA's address fields).
DRAM_ADDR_BITS = 32


class DRAMReadSignature(wiring.Signature):
    """Read channel, seen from the NPU (the requester)."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({
            "req_valid": Out(1),
            "req_addr": Out(DRAM_ADDR_BITS),
            "resp_valid": In(1),
            "resp_data": In(data.ArrayLayout(unsigned(8), cfg.dram_beat_bytes)),
        })


class DRAMWriteSignature(wiring.Signature):
    """Write channel, seen from the NPU: ``mask`` bit ``k`` enables byte ``k`` of the beat."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({
            "valid": Out(1),
            "addr": Out(DRAM_ADDR_BITS),
            "data": Out(data.ArrayLayout(unsigned(8), cfg.dram_beat_bytes)),
            "mask": Out(cfg.dram_beat_bytes),
        })


class DRAMModel(wiring.Component):
    """``size`` bytes of DRAM (a power of two, at least one beat; addresses wrap) with the
    contract's latency and beat width. ``init`` (bytes-like or uint8 array) preloads it.

    :meth:`lane_row` tells where a byte lives, for testbenches that read ``lanes[j]`` directly.
    """

    def __init__(self, cfg: NPUConfig, size: int, init: Any = None) -> None:
        beat = cfg.dram_beat_bytes
        if size < beat or size & (size - 1):
            raise ValueError(f"DRAMModel size must be a power of two >= {beat} bytes, got {size}")
        self.cfg, self.size, self.beat = cfg, size, beat
        depth = size // beat
        image = np.zeros(size, dtype=np.uint8)
        if init is not None:
            raw = np.frombuffer(bytes(init), dtype=np.uint8) if not isinstance(init, np.ndarray) \
                else np.asarray(init, dtype=np.uint8).ravel()
            if len(raw) > size:
                raise ValueError(f"DRAM image of {len(raw)} bytes exceeds the model's {size}")
            image[:len(raw)] = raw
        by_lane = image.reshape(depth, beat)
        #: One MemoryData per beat lane; byte ``a`` is row ``a // beat`` of lane ``a % beat``.
        self.lanes = [MemoryData(shape=8, depth=depth, init=by_lane[:, j].tolist())
                      for j in range(beat)]
        super().__init__({
            "rd": In(DRAMReadSignature(cfg)), "wr": In(DRAMWriteSignature(cfg)),
            # Host access by aligned beat (row ``addr`` = bytes addr*beat ..): load and read
            # back images from a testbench that cannot reach the memories directly.
            "host": In(wiring.Signature({
                "addr": Out(max(1, exact_log2(depth))), "we": Out(beat),
                "wdata": Out(data.ArrayLayout(unsigned(8), beat)),
                "rdata": In(data.ArrayLayout(unsigned(8), beat))})),
        })

    def lane_row(self, addr: int) -> tuple[int, int]:
        """(lane, row) holding byte ``addr``."""
        addr %= self.size
        return addr % self.beat, addr // self.beat

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        beat, lb = self.beat, exact_log2(self.beat)
        lat = self.cfg.dram_latency
        rd_ports, wr_ports = [], []
        for j, lane in enumerate(self.lanes):
            m.submodules[f"lane{j}"] = mem = memory.Memory(data=lane)
            rd_ports.append(mem.read_port())
            wr_ports.append(mem.write_port())
            host_w, host_r = mem.write_port(), mem.read_port()
            m.d.comb += [host_w.addr.eq(self.host.addr), host_w.data.eq(self.host.wdata[j]),
                         host_w.en.eq(self.host.we[j]), host_r.addr.eq(self.host.addr),
                         self.host.rdata[j].eq(host_r.data)]

        # Read: lane j holds byte k = (j - addr) mod beat of the beat, at row
        # addr // beat + (1 if j < addr mod beat else 0).
        rot = self.rd.req_addr[:lb] if lb else Const(0, 1)
        base = self.rd.req_addr >> lb
        for j, port in enumerate(rd_ports):
            m.d.comb += port.addr.eq(base + _below(j, rot, beat))
        rot_q = Signal.like(rot)
        valid_q = Signal()
        m.d.sync += [rot_q.eq(rot), valid_q.eq(self.rd.req_valid)]
        beat_now = Signal(data.ArrayLayout(unsigned(8), beat))
        for k in range(beat):
            sel = (rot_q + k)[:lb] if lb else 0
            m.d.comb += beat_now[k].eq(_pick([p.data for p in rd_ports], sel))
        # Sync read gives one cycle; the rest of the latency is a delay line.
        resp = data.StructLayout({"valid": 1, "data": data.ArrayLayout(unsigned(8), beat)})
        m.submodules.rd_delay = rd_delay = DelayLine(resp, lat - 1)
        m.d.comb += [rd_delay.i.valid.eq(valid_q), rd_delay.i.data.eq(beat_now),
                     self.rd.resp_valid.eq(rd_delay.o.valid),
                     self.rd.resp_data.eq(rd_delay.o.data)]

        # Write: delayed by latency - 1 so it lands at the end of cycle t + latency - 1.
        req = data.StructLayout({"valid": 1, "addr": DRAM_ADDR_BITS,
                                 "data": data.ArrayLayout(unsigned(8), beat), "mask": beat})
        m.submodules.wr_delay = wr_delay = DelayLine(req, lat - 1)
        m.d.comb += [wr_delay.i.valid.eq(self.wr.valid), wr_delay.i.addr.eq(self.wr.addr),
                     wr_delay.i.data.eq(self.wr.data), wr_delay.i.mask.eq(self.wr.mask)]
        w = wr_delay.o
        wrot = w.addr[:lb] if lb else Const(0, 1)
        wbase = w.addr >> lb
        for j, port in enumerate(wr_ports):
            k = (Const(j, lb + 1) - wrot)[:lb] if lb else Const(0, 1)
            m.d.comb += [port.addr.eq(wbase + _below(j, wrot, beat)),
                         port.data.eq(_pick([w.data[i] for i in range(beat)], k)),
                         port.en.eq(w.valid & w.mask.bit_select(k, 1))]
        return m


def _below(j: int, rot: Any, beat: int) -> Any:
    """1 when lane ``j`` lies below the beat's rotation ``rot`` (its byte is in the next row);
    the last lane never does."""
    return Const(0, 1) if j == beat - 1 else (Const(j, max(rot.shape().width, 1)) < rot)


def _pick(values: list[Any], sel: Any) -> Any:
    """``values[sel]`` as a mux tree (sel may be a constant 0)."""
    if len(values) == 1:
        return values[0]
    out = values[0]
    for i in range(1, len(values)):
        out = Mux(sel == i, values[i], out)
    return out
