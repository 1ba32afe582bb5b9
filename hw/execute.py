"""The EX engine: its weight unit (PRELOAD) and its array unit (MATMUL) around the systolic array.

Timing against the contract (``s`` = start cycle, ``A = rows + cols - 1`` the array latency):

* PRELOAD reads SPAD row ``spad_addr + k`` at ``s + k`` and writes weight row ``k`` of its bank
  at ``s + k + 1``; a MATMUL with ``swap`` may start at ``c = s + rows``, and its first vector
  reaches array row ``k`` at ``c + 1 + k``, after that row's weights were written.
* MATMUL reads input ``j`` at ``s + j``; it enters the array at ``s + j + 1``; its results leave
  at ``W = s + j + rows + cols``, when the ACC row (read at ``W - 1`` through a port transparent
  to this unit's own writes, so back-to-back accumulation into one row is exact) is written.
  The last row lands at ``s + n - 1 + rows + cols = c - 1``.
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from npu import isa
from npu.isa import NPUConfig, Opcode

from .array import SystolicArray, WeightWriteLayout
from .common import DelayLine, Walk, mem_signatures, start_signature, wrap32
from .decode import view

__all__ = ["WeightLoader", "MatmulUnit", "ExecuteEngine"]

_ROW = 20


class WeightLoader(wiring.Component):
    """EX_WEIGHTS unit: PRELOAD copies ``rows`` SPAD rows into one weight bank of the array."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        super().__init__({
            "start": In(start_signature(cfg)),
            "spad_r": mem_signatures(cfg)["spad_r"],
            "weights": Out(WeightWriteLayout(cfg)),
            "busy": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        rows = self.cfg.rows
        go, p = self.start.valid, self.start.payload
        saved_addr, saved_bank = Signal(_ROW), Signal()
        with m.If(go):
            m.d.sync += [saved_addr.eq(view(Opcode.PRELOAD, p.word).spad_addr),
                         saved_bank.eq(p.bank)]
        addr = Mux(go, view(Opcode.PRELOAD, p.word).spad_addr, saved_addr)
        bank = Mux(go, p.bank, saved_bank)
        running = Signal()
        k_r = Signal(range(rows))
        k = Mux(go, 0, k_r)
        active = go | running
        m.d.comb += [self.busy.eq(active), self.spad_r.addr.eq(addr + k)]
        with m.If(active):
            m.d.sync += [k_r.eq(k + 1), running.eq(k != rows - 1)]
        q_valid, q_row, q_bank = Signal(), Signal.like(k_r), Signal()
        m.d.sync += [q_valid.eq(active), q_row.eq(k), q_bank.eq(bank)]
        m.d.comb += [self.weights.en.eq(q_valid), self.weights.bank.eq(q_bank),
                     self.weights.row.eq(q_row), self.weights.data.eq(self.spad_r.data)]
        return m


class MatmulUnit(wiring.Component):
    """EX_ARRAY unit: MATMUL streams its (2-D strided) SPAD inputs into the array, one per cycle,
    and writes (or accumulates into) consecutive ACC rows as the results come out."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        sigs = mem_signatures(cfg)
        super().__init__({
            "start": In(start_signature(cfg)),
            "spad_r": sigs["spad_r"],
            "acc_r": sigs["acc_r"],
            "acc_w": sigs["acc_w"],
            "x": Out(data.ArrayLayout(signed(8), cfg.rows)),
            "sel": Out(1),
            "y": In(data.ArrayLayout(signed(32), cfg.cols)),
            "busy": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        cfg = self.cfg
        go, p = self.start.valid, self.start.payload
        saved_word, saved_bank = Signal(isa.INSTR_BITS), Signal()
        with m.If(go):
            m.d.sync += [saved_word.eq(p.word), saved_bank.eq(p.bank)]
        mm = view(Opcode.MATMUL, Mux(go, p.word, saved_word))
        bank = Mux(go, p.bank, saved_bank)
        running = Signal()
        active = go | running
        m.d.comb += self.busy.eq(active)
        w = Walk(m, go, mm.n_inner, mm.n_outer, name="mm")
        spad = w.stream(mm.spad_addr, mm.spad_stride_outer, mm.spad_stride_inner, _ROW)
        acc = w.stream(mm.acc_addr, mm.n_inner, 1, _ROW)
        w.build(active)
        m.d.sync += running.eq(active & ~w.last)
        m.d.comb += self.spad_r.addr.eq(spad)

        # The SPAD row arrives next cycle, with its bank select, into the array.
        sel_q = Signal()
        m.d.sync += sel_q.eq(bank)
        m.d.comb += [self.x.eq(self.spad_r.data), self.sel.eq(sel_q)]

        # Metadata travels beside the array and meets the results at the ACC.
        meta_layout = data.StructLayout({"valid": 1, "accumulate": 1, "row": _ROW})
        meta = Signal(meta_layout)
        m.d.comb += [meta.valid.eq(active), meta.accumulate.eq(mm.accumulate), meta.row.eq(acc)]
        m.submodules.meta_delay = md = DelayLine(meta_layout, cfg.rows + cfg.cols - 1)
        m.d.comb += [md.i.eq(meta), self.acc_r.addr.eq(md.o.row)]
        q = Signal(meta_layout)
        m.d.sync += q.eq(md.o)
        m.d.comb += [self.acc_w.addr.eq(q.row), self.acc_w.en.eq(q.valid)]
        for c in range(cfg.cols):
            y = self.y[c]
            m.d.comb += self.acc_w.data[c].eq(Mux(q.accumulate, wrap32(self.acc_r.data[c] + y), y))
        return m


class ExecuteEngine(wiring.Component):
    """The EX engine's datapath: weight loader + matmul unit + systolic array."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        sigs = mem_signatures(cfg)
        super().__init__({
            "preload": In(start_signature(cfg)),
            "matmul": In(start_signature(cfg)),
            "spad_r_weights": sigs["spad_r"],
            "spad_r_inputs": sigs["spad_r"],
            "acc_r": sigs["acc_r"],
            "acc_w": sigs["acc_w"],
            "busy_weights": Out(1),
            "busy_array": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        m.submodules.weights = wl = WeightLoader(self.cfg)
        m.submodules.matmul = mu = MatmulUnit(self.cfg)
        m.submodules.array = arr = SystolicArray(self.cfg)
        wiring.connect(m, wiring.flipped(self.preload), wl.start)
        wiring.connect(m, wiring.flipped(self.matmul), mu.start)
        wiring.connect(m, wiring.flipped(self.spad_r_weights), wl.spad_r)
        wiring.connect(m, wiring.flipped(self.spad_r_inputs), mu.spad_r)
        wiring.connect(m, wiring.flipped(self.acc_r), mu.acc_r)
        wiring.connect(m, wiring.flipped(self.acc_w), mu.acc_w)
        m.d.comb += [arr.weights.eq(wl.weights), arr.x.eq(mu.x), arr.sel.eq(mu.sel),
                     mu.y.eq(arr.y), self.busy_weights.eq(wl.busy),
                     self.busy_array.eq(mu.busy)]
        return m
