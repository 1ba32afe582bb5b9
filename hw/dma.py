"""The DMA engines: LD (LOAD, GATHER: DRAM -> SPAD/ACC) and ST (STORE: SPAD/ACC -> DRAM).

Both issue one beat per cycle from their start cycle on, which is what the contract's busy
formula counts; a LOAD/GATHER row is written when its last beat returns, ``dram_latency``
cycles after the request, so the last row is in place at the end of cycle ``c - 1``. A STORE
reads a row one cycle before sending each of its beats; the DRAM model lands a beat
``dram_latency - 1`` cycles after it was sent, so the last one is visible at ``c``.
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from npu import isa
from npu.isa import Mem, NPUConfig, Opcode

from .common import DelayLine, FaultLayout, StartLayout, Walk, mem_signatures, start_signature
from .decode import opcode_of, view
from .dram import DRAM_ADDR_BITS, DRAMReadSignature, DRAMWriteSignature

__all__ = ["LoadUnit", "StoreUnit"]

_ROW = 20  # row address width of the ISA


def _cdiv_pow2(a: Any, b: int) -> Any:
    return (a + (b - 1)) >> exact_log2(b)


class LoadUnit(wiring.Component):
    """The LD engine's DMA: LOAD (2-D strided copy or fill) and GATHER (rows picked by an int32
    index list read into the index buffer first).

    A GATHER reads its ``cdiv(4n, beat)`` index beats, waits ``dram_latency`` cycles for the last
    one, then fetches one row per index; an index whose row lies outside DRAM raises ``fault``
    (reported with the GATHER's index and start cycle, as the contract dates it) when that row
    is reached. ``gather_busy`` tells the control that a GATHER may still raise it.
    """

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        sigs = mem_signatures(cfg)
        super().__init__({
            "start": In(start_signature(cfg)),
            "dram": Out(DRAMReadSignature(cfg)),
            "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "spad_w": sigs["spad_w"],
            "acc_w": sigs["acc_w"],
            "fault": Out(FaultLayout(cfg)),
            "busy": Out(1),
            "gather_busy": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        cfg = self.cfg
        beat, lb = cfg.dram_beat_bytes, exact_log2(cfg.dram_beat_bytes)
        row_bytes_max = cfg.acc_row_bytes
        go = self.start.valid
        p = self.start.payload

        saved = Signal(StartLayout(cfg))
        with m.If(go):
            m.d.sync += saved.eq(p)
        cur = data.View(StartLayout(cfg), Mux(go, p.as_value(), saved.as_value()))
        word = cur.word
        ld, ga = view(Opcode.LOAD, word), view(Opcode.GATHER, word)
        gather = opcode_of(word) == int(Opcode.GATHER)

        # Phases: LOAD rows, or GATHER index beats, wait for the last index, rows.
        P_LOAD, P_INDEX, P_WAIT, P_ROWS = range(4)
        running = Signal()
        phase_r = Signal(2)
        phase = Mux(go, Mux(gather, P_INDEX, P_LOAD), phase_r)
        active = go | running
        m.d.comb += [self.busy.eq(active), self.gather_busy.eq(active & gather)]

        # LOAD walk: runs x rows x beats (fill: one cycle per row).
        bpr_ld = Mux(ld.fill, 1, _cdiv_pow2(ld.row_bytes, beat))
        wl = Walk(m, go, ld.n_inner, ld.n_outer, bpr_ld, name="ld")
        ld_dram = wl.stream(ld.dram_addr, ld.dram_stride_outer, ld.dram_stride_inner,
                            DRAM_ADDR_BITS)
        ld_dst = wl.stream(ld.dst, ld.dst_stride_outer, 1, _ROW)
        wl.build(active & (phase == P_LOAD))

        # GATHER: one counter `k` (index beats, wait cycles, beats of a row) and the row `i`.
        ib = _cdiv_pow2(4 * ga.n, beat)
        bpr_ga = _cdiv_pow2(ga.row_bytes, beat)
        lat = cfg.dram_latency
        k_max = max(-(-4 * cfg.gather_max // beat), lat, -(-cfg.acc_row_bytes // beat))
        k_r, i_r = Signal(k_max.bit_length()), Signal(17)
        k = Mux(go, 0, k_r)
        i = Mux(go, 0, i_r)
        last_row_beat = k == bpr_ga - 1
        with m.If(active):
            with m.Switch(phase):
                with m.Case(P_INDEX):
                    with m.If(k == ib - 1):
                        m.d.sync += [phase_r.eq(P_WAIT), k_r.eq(0)]
                    with m.Else():
                        m.d.sync += [phase_r.eq(P_INDEX), k_r.eq(k + 1)]
                with m.Case(P_WAIT):
                    with m.If(k == lat - 1):
                        m.d.sync += [phase_r.eq(P_ROWS), k_r.eq(0), i_r.eq(0)]
                    with m.Else():
                        m.d.sync += k_r.eq(k + 1)
                with m.Case(P_ROWS):
                    with m.If(last_row_beat):
                        m.d.sync += [k_r.eq(0), i_r.eq(i + 1)]
                    with m.Else():
                        m.d.sync += k_r.eq(k + 1)
                with m.Case(P_LOAD):
                    m.d.sync += phase_r.eq(P_LOAD)
        done = Mux(phase == P_LOAD, wl.last,
                   (phase == P_ROWS) & last_row_beat & (i == ga.n - 1))
        m.d.sync += running.eq(active & ~done)

        # Index buffer: rows of max(beat, 4) bytes, written a beat at a time.
        ibw = max(beat, 4)
        gran = 8 * min(beat, 4)
        idx_rows = -(-4 * cfg.gather_max // ibw)
        m.submodules.index_buf = ibuf = memory.Memory(shape=8 * ibw, depth=idx_rows, init=[])
        ib_w = ibuf.write_port(granularity=gran)
        ib_r = ibuf.read_port(transparent_for=(ib_w,))
        # The index of row i is read one cycle before the row's first beat.
        want = Signal(17)
        m.d.comb += want.eq(Mux(phase == P_WAIT, 0, i + 1))
        ib_shift = exact_log2(ibw) - 2  # indices per buffer row = 2**ib_shift
        m.d.comb += ib_r.addr.eq(want >> ib_shift)
        lane_q = Signal(max(ib_shift, 1))
        if ib_shift:
            m.d.sync += lane_q.eq(want[:ib_shift])
        idx = Signal(signed(32))
        m.d.comb += idx.eq(ib_r.data.word_select(lane_q, 32).as_signed() if ib_shift
                           else ib_r.data[:32].as_signed())
        row_base_r = Signal(DRAM_ADDR_BITS)
        first_beat = (phase == P_ROWS) & (k == 0)
        row_base_full = ga.dram_addr + idx * ga.row_stride
        row_base = Mux(first_beat, row_base_full[:DRAM_ADDR_BITS], row_base_r)
        with m.If(active & first_beat):
            m.d.sync += row_base_r.eq(row_base_full[:DRAM_ADDR_BITS])
        bad = (idx < 0) | (row_base_full + ga.row_bytes > self.dram_bytes)
        m.d.comb += [self.fault.valid.eq(active & first_beat & bad),
                     self.fault.index.eq(cur.index), self.fault.cycle.eq(cur.cycle)]

        # Issue: a DRAM request and the metadata that meets its data dram_latency later.
        beat_w = max(ceil_log2(max(idx_rows * ibw // beat, -(-row_bytes_max // beat)) + 1), 1)
        meta_layout = data.StructLayout({
            "valid": 1, "index": 1, "write": 1, "mem": 1, "fill": 1, "fill_value": signed(8),
            "row_bytes": 12, "beat": beat_w, "dst": _ROW})
        meta = Signal(meta_layout)
        req_addr = Signal(DRAM_ADDR_BITS)
        with m.If(active):
            with m.Switch(phase):
                with m.Case(P_LOAD):
                    m.d.comb += [req_addr.eq(ld_dram + (wl.b << lb)),
                                 self.dram.req_valid.eq(~ld.fill),
                                 meta.valid.eq(1), meta.write.eq(wl.last_beat),
                                 meta.mem.eq(ld.mem), meta.fill.eq(ld.fill),
                                 meta.fill_value.eq(ld.fill_value),
                                 meta.row_bytes.eq(ld.row_bytes), meta.beat.eq(wl.b),
                                 meta.dst.eq(ld_dst)]
                with m.Case(P_INDEX):
                    m.d.comb += [req_addr.eq(ga.index_addr + (k << lb)),
                                 self.dram.req_valid.eq(1), meta.valid.eq(1), meta.index.eq(1),
                                 meta.beat.eq(k)]
                with m.Case(P_ROWS):
                    m.d.comb += [req_addr.eq(row_base + (k << lb)),
                                 self.dram.req_valid.eq(1), meta.valid.eq(1),
                                 meta.write.eq(last_row_beat), meta.mem.eq(ga.mem),
                                 meta.row_bytes.eq(ga.row_bytes), meta.beat.eq(k),
                                 meta.dst.eq(ga.dst + i)]
        m.d.comb += self.dram.req_addr.eq(req_addr)
        m.submodules.meta_delay = md = DelayLine(meta_layout, lat)
        m.d.comb += md.i.eq(meta)
        mo = md.o
        resp = self.dram.resp_data

        # Index beats into the index buffer.
        if beat >= 4:
            m.d.comb += [ib_w.addr.eq(mo.beat), ib_w.data.eq(Cat(*[resp[j] for j in range(beat)])),
                         ib_w.en.eq(Mux(mo.valid & mo.index, (1 << (ibw * 8 // gran)) - 1, 0))]
        else:
            parts = 4 // beat
            m.d.comb += [ib_w.addr.eq(mo.beat >> exact_log2(parts)),
                         ib_w.data.eq(Cat(*[resp[j] for j in range(beat)] * parts)),
                         ib_w.en.eq(Mux(mo.valid & mo.index,
                                        Const(1, parts) << mo.beat[:exact_log2(parts)], 0))]

        # Row assembly: byte j of a row always arrives on lane j % beat of beat j // beat.
        asm = [Signal(8, name=f"asm{j}") for j in range(row_bytes_max)]
        row = []
        is_row = mo.valid & ~mo.index
        for j in range(row_bytes_max):
            here = mo.beat == j // beat
            with m.If(is_row & ~mo.fill & here):
                m.d.sync += asm[j].eq(resp[j % beat])
            byte = Mux(mo.fill, mo.fill_value.as_unsigned(), Mux(here, resp[j % beat], asm[j]))
            row.append(Mux(j < mo.row_bytes, byte, 0))
        wr = is_row & mo.write
        m.d.comb += [self.spad_w.addr.eq(mo.dst), self.acc_w.addr.eq(mo.dst),
                     self.spad_w.en.eq(wr & (mo.mem == int(Mem.SPAD))),
                     self.acc_w.en.eq(wr & (mo.mem == int(Mem.ACC)))]
        for c in range(cfg.cols):
            m.d.comb += [self.spad_w.data[c].eq(row[c]),
                         self.acc_w.data[c].eq(Cat(*row[4 * c:4 * c + 4]))]
        return m


class StoreUnit(wiring.Component):
    """The ST engine's DMA: STORE, a 2-D strided copy of rows (their first ``row_bytes`` bytes)
    from SPAD or ACC to DRAM, one beat per cycle."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        sigs = mem_signatures(cfg)
        super().__init__({
            "start": In(start_signature(cfg)),
            "dram": Out(DRAMWriteSignature(cfg)),
            "spad_r": sigs["spad_r"],
            "acc_r": sigs["acc_r"],
            "busy": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        cfg = self.cfg
        beat, lb = cfg.dram_beat_bytes, exact_log2(cfg.dram_beat_bytes)
        go = self.start.valid
        saved = Signal(isa.INSTR_BITS)
        with m.If(go):
            m.d.sync += saved.eq(self.start.payload.word)
        st = view(Opcode.STORE, Mux(go, self.start.payload.word, saved))
        running = Signal()
        active = go | running
        m.d.comb += self.busy.eq(active)

        bpr = _cdiv_pow2(st.row_bytes, beat)
        w = Walk(m, go, st.n_inner, st.n_outer, bpr, name="st")
        dram_row = w.stream(st.dram_addr, st.dram_stride_outer, st.dram_stride_inner,
                            DRAM_ADDR_BITS)
        src_row = w.stream(st.src, st.src_stride_outer, 1, _ROW)
        w.build(active)
        m.d.sync += running.eq(active & ~w.last)
        m.d.comb += [self.spad_r.addr.eq(src_row), self.acc_r.addr.eq(src_row)]

        # One cycle later the row is out of memory: send its beat.
        nbeats = -(-cfg.acc_row_bytes // beat)
        q = Signal(data.StructLayout({"valid": 1, "mem": 1, "beat": max(ceil_log2(nbeats), 1),
                                      "addr": DRAM_ADDR_BITS, "row_bytes": 12}))
        m.d.sync += [q.valid.eq(active), q.mem.eq(st.mem), q.beat.eq(w.b),
                     q.addr.eq(dram_row + (w.b << lb)), q.row_bytes.eq(st.row_bytes)]
        acc_bytes = [self.acc_r.data[c][8 * j:8 * j + 8]
                     for c in range(cfg.cols) for j in range(4)]
        spad_bytes = [self.spad_r.data[c].as_unsigned() for c in range(cfg.cols)]
        row = [Mux(q.mem == int(Mem.ACC), acc_bytes[j],
                   spad_bytes[j] if j < len(spad_bytes) else 0) for j in range(len(acc_bytes))]
        for j in range(beat):
            byte = Const(0, 8)
            for b in range(nbeats):
                if b * beat + j < len(row):
                    byte = Mux(q.beat == b, row[b * beat + j], byte)
            m.d.comb += [self.dram.data[j].eq(byte),
                         self.dram.mask[j].eq((q.beat << lb) + j < q.row_bytes)]
        m.d.comb += [self.dram.valid.eq(q.valid), self.dram.addr.eq(q.addr)]
        return m
