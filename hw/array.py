"""The weight-stationary systolic array: processing elements with two weight banks.

Data flow (TPU v1 style, weight stationary): input lane ``k`` (the reduction index) enters array
row ``k`` skewed by ``k`` cycles and moves one column right per cycle; partial sums move one row
down per cycle; column ``c``'s sum leaves the bottom row and is de-skewed by ``cols - 1 - c``
cycles. An input vector presented at cycle ``T`` gives its ``cols`` int32 results at
``T + rows + cols - 1`` (:attr:`SystolicArray.latency`). Each input vector carries its weight
bank, so back-to-back vectors may use different banks (a MATMUL with ``swap`` right after
another MATMUL) without draining the array.
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from npu.isa import NPUConfig

from .common import wrap32

__all__ = ["PE", "SystolicArray", "WeightWriteLayout"]


class PE(wiring.Component):
    """One processing element: ``psum_out <= wrap32(psum_in + x_in * w[sel_in])`` and
    ``x_out, sel_out <= x_in, sel_in`` (registered). ``w_en`` loads weight ``w_data`` into bank
    ``w_bank``."""

    def __init__(self) -> None:
        super().__init__({
            "x_in": In(signed(8)), "sel_in": In(1), "psum_in": In(signed(32)),
            "x_out": Out(signed(8)), "sel_out": Out(1), "psum_out": Out(signed(32)),
            "w_en": In(1), "w_bank": In(1), "w_data": In(signed(8)),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        w = [Signal(signed(8), name=f"w{b}") for b in range(2)]
        for b in range(2):
            with m.If(self.w_en & (self.w_bank == b)):
                m.d.sync += w[b].eq(self.w_data)
        weight = Mux(self.sel_in, w[1], w[0])
        m.d.sync += [self.x_out.eq(self.x_in), self.sel_out.eq(self.sel_in),
                     self.psum_out.eq(wrap32(self.psum_in + self.x_in * weight))]
        return m


class WeightWriteLayout(data.StructLayout):
    """One weight row written by PRELOAD: row ``k`` (input lane) of bank ``bank``."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({"en": 1, "bank": 1, "row": max(1, ceil_log2(cfg.rows)),
                          "data": data.ArrayLayout(signed(8), cfg.cols)})


class SystolicArray(wiring.Component):
    """``rows x cols`` PEs. ``x`` (``rows`` int8 lanes) and ``sel`` enter every cycle; ``y``
    (``cols`` int32 lanes) is ``x @ W[sel]`` of the vector that entered ``latency`` cycles ago.
    ``weights`` writes one row of one bank per cycle."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        super().__init__({
            "x": In(data.ArrayLayout(signed(8), cfg.rows)),
            "sel": In(1),
            "weights": In(WeightWriteLayout(cfg)),
            "y": Out(data.ArrayLayout(signed(32), cfg.cols)),
        })

    @property
    def latency(self) -> int:
        return self.cfg.rows + self.cfg.cols - 1

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        rows, cols = self.cfg.rows, self.cfg.cols
        pes = [[PE() for _ in range(cols)] for _ in range(rows)]
        for k in range(rows):
            for c in range(cols):
                m.submodules[f"pe_{k}_{c}"] = pe = pes[k][c]
                m.d.comb += [pe.w_en.eq(self.weights.en & (self.weights.row == k)),
                             pe.w_bank.eq(self.weights.bank), pe.w_data.eq(self.weights.data[c])]
        # Input skew: lane k (with its bank select) is delayed k cycles before column 0.
        for k in range(rows):
            x, sel = self.x[k], self.sel
            for j in range(k):
                xr, sr = Signal(signed(8), name=f"skew_x{k}_{j}"), Signal(name=f"skew_s{k}_{j}")
                m.d.sync += [xr.eq(x), sr.eq(sel)]
                x, sel = xr, sr
            m.d.comb += [pes[k][0].x_in.eq(x), pes[k][0].sel_in.eq(sel)]
            for c in range(1, cols):
                m.d.comb += [pes[k][c].x_in.eq(pes[k][c - 1].x_out),
                             pes[k][c].sel_in.eq(pes[k][c - 1].sel_out)]
        for c in range(cols):
            m.d.comb += pes[0][c].psum_in.eq(0)
            for k in range(1, rows):
                m.d.comb += pes[k][c].psum_in.eq(pes[k - 1][c].psum_out)
            # Output de-skew: column c leaves the bottom c cycles after column 0.
            y = pes[rows - 1][c].psum_out
            for j in range(cols - 1 - c):
                yr = Signal(signed(32), name=f"deskew{c}_{j}")
                m.d.sync += yr.eq(y)
                y = yr
            m.d.comb += self.y[c].eq(y)
        return m
