"""The NPU's control: dispatcher, per-engine in-order queues, token counters, unit timers,
in-order retirement, faults, status and the cycle counter.

This is a direct implementation of the per-cycle model of ``docs/architecture.md``. Every cycle
``t`` evaluates, combinationally and in this order:

1. **retire**: each engine's in-flight FIFO holds ``(c, signal, index)`` of its started,
   unretired instructions in program order; the head retires when ``c <= t`` and adds its
   signal tokens (a counter already at ``token_max`` faults TOKEN_OVERFLOW);
2. **start**: each engine's queue head starts when its unit is free (``t >= unit_free[unit]``),
   its wait tokens are there (counting this cycle's retirements), fewer than ``retire_depth``
   of its instructions are in flight, and the bank rules hold; it then hands the instruction
   to its unit's datapath, records ``c = t + latency`` and sets ``unit_free = t + busy`` (the
   contract's formulas, generated from ``npu.isa.TIMING``);
3. **dispatch**: the instruction at ``pc`` (prefetched from the instruction memory the cycle
   before) is checked (legal encoding, static addresses) and goes to its engine's queue if the
   queue has room after this cycle's start; BARRIER waits until everything before it retired;
   HALT stops dispatch.

The program ends at the first cycle ``t`` (checked after retirement, as is the watchdog) at
which HALT was dispatched earlier and every instruction retired; ``cycles`` is that ``t``,
which equals ``max(last retire cycle, HALT dispatch cycle + 1)``.
"""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Const, Module, Mux, Signal, Value, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from npu import isa
from npu.isa import Engine, Fault, NPUConfig, Opcode, Unit

from . import decode
from .common import CYCLE_BITS, FaultLayout, Fifo, comb_signal, index_bits, start_signature
from .dram import DRAM_ADDR_BITS

__all__ = ["Control", "StatusLayout", "TraceLayout", "ENGINE_OPS", "UNITS"]

NE = len(Engine)
#: Opcodes each engine executes (SYNC goes to any engine, by its `engine` field).
ENGINE_OPS: dict[Engine, list[Opcode]] = {
    e: [op for op, eng in isa.OPCODE_ENGINE.items() if eng == e] for e in Engine}
#: Units with a datapath (SYNC's Unit.NONE has none).
UNITS = [u for u in Unit if u != Unit.NONE]


class StatusLayout(data.StructLayout):
    """The status register: running / done / faulted, the fault record, total cycles."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({
            "running": 1, "done": 1, "fault": 1, "code": 3,
            "fault_cycle": unsigned(CYCLE_BITS), "fault_index": unsigned(index_bits(cfg)),
            "cycles": unsigned(CYCLE_BITS)})


class TraceLayout(data.StructLayout):
    """Per-cycle events for an instruction trace: for each engine the index of the instruction
    that became ready (queue head), started (with its completion cycle) and retired; and the
    dispatched instruction (``barrier``: a BARRIER or HALT, which the contract records as
    starting at its dispatch and retiring one cycle later). ``cycle`` is the current cycle."""

    def __init__(self, cfg: NPUConfig) -> None:
        iw = index_bits(cfg)
        ev = data.StructLayout({"valid": 1, "index": unsigned(iw)})
        st = data.StructLayout({"valid": 1, "index": unsigned(iw),
                                "complete": unsigned(CYCLE_BITS)})
        super().__init__({
            "cycle": unsigned(CYCLE_BITS),
            "ready": data.ArrayLayout(ev, NE),
            "start": data.ArrayLayout(st, NE),
            "retire": data.ArrayLayout(ev, NE),
            "dispatch": data.StructLayout({"valid": 1, "index": unsigned(iw), "barrier": 1}),
        })


class _QueueEntry(data.StructLayout):
    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({"word": unsigned(isa.INSTR_BITS), "index": unsigned(index_bits(cfg))})


class _InflightEntry(data.StructLayout):
    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({"complete": unsigned(CYCLE_BITS), "signal": unsigned(NE),
                          "index": unsigned(index_bits(cfg))})


def _unit_name(u: Unit) -> str:
    return u.name.lower()


class HeadDecoder(wiring.Component):
    """What the start phase needs to know about an engine's queue head: busy and latency (the
    contract's formulas for this engine's opcodes), its unit, tokens and bank-rule class.
    A separate component so that it is re-evaluated only when the head changes."""

    def __init__(self, cfg: NPUConfig, engine: Engine) -> None:
        self.cfg, self.engine = cfg, engine
        super().__init__({
            "word": In(isa.INSTR_BITS),
            "busy": Out(CYCLE_BITS), "latency": Out(CYCLE_BITS),
            "unit": Out(range(len(Unit))),
            "wait": Out(NE), "signal": Out(NE),
            "preload": Out(1), "matmul": Out(1), "swap": Out(1), "eltwise": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        hdr = data.View(decode.HEADER_LAYOUT, self.word)
        opc = hdr.opcode
        m.d.comb += [self.busy.eq(1), self.latency.eq(1), self.unit.eq(int(Unit.NONE)),
                     self.wait.eq(hdr.wait), self.signal.eq(hdr.signal),
                     self.swap.eq(decode.view(Opcode.MATMUL, self.word).swap)]
        for op in ENGINE_OPS[self.engine]:
            busy, lat = decode.timing(op, self.word, self.cfg)
            with m.If(opc == int(op)):
                m.d.comb += [self.busy.eq(busy), self.latency.eq(lat),
                             self.unit.eq(int(isa.OPCODE_UNIT[op]))]
        m.d.comb += [self.preload.eq(opc == int(Opcode.PRELOAD)),
                     self.matmul.eq(opc == int(Opcode.MATMUL)),
                     self.eltwise.eq(opc == int(Opcode.ELTWISE))]
        return m


class DispatchDecoder(wiring.Component):
    """The dispatcher's checks of the word at ``pc``: legal encoding (and ``pc`` inside the
    program), static addresses in range, target engine, BARRIER/HALT."""

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        super().__init__({
            "word": In(isa.INSTR_BITS), "pc": In(index_bits(cfg)),
            "n_instr": In(index_bits(cfg)), "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "legal": Out(1), "address_ok": Out(1), "engine": Out(2),
            "halt": Out(1), "barrier": Out(1),
        })

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        opc = data.View(decode.HEADER_LAYOUT, self.word).opcode
        m.d.comb += [self.legal.eq(decode.legal(self.word) & (self.pc < self.n_instr)),
                     self.address_ok.eq(decode.address_ok(self.word, self.cfg, self.dram_bytes)),
                     self.engine.eq(decode.engine_of(self.word)),
                     self.halt.eq(opc == int(Opcode.HALT)),
                     self.barrier.eq(opc == int(Opcode.BARRIER))]
        return m


class Control(wiring.Component):
    """Dispatcher, queues, tokens, retirement, faults and status of the NPU.

    Host side: pulse ``start`` (with ``n_instr``, ``dram_bytes`` and ``watchdog`` set) to run
    the program in the instruction memory from index 0; ``status`` reports the outcome. A fault
    leaves the datapaths mid-flight: reset the NPU before the next run.
    """

    def __init__(self, cfg: NPUConfig) -> None:
        self.cfg = cfg
        iw = index_bits(cfg)
        members: dict[str, Any] = {
            "start": In(1),
            "n_instr": In(iw),
            "dram_bytes": In(DRAM_ADDR_BITS + 1),
            "watchdog": In(CYCLE_BITS),
            "status": Out(StatusLayout(cfg)),
            "imem": In(memory.ReadPort.Signature(addr_width=ceil_log2(cfg.imem_depth),
                                                 shape=isa.INSTR_BITS)),
            "gather_fault": In(FaultLayout(cfg)),
            "gather_busy": In(1),         # a GATHER is in the LD unit, checking its indices
            "trace": Out(TraceLayout(cfg)),
        }
        for u in UNITS:
            members[_unit_name(u)] = Out(start_signature(cfg))
        super().__init__(members)

    def unit_port(self, unit: Unit) -> Any:
        """The start stream of ``unit``."""
        return getattr(self, _unit_name(unit))

    def elaborate(self, platform: Any) -> Module:  # noqa: C901 - one cycle of the model
        m = Module()
        cfg = self.cfg
        iw = index_bits(cfg)
        tw = max(cfg.token_max.bit_length(), 1)

        running = Signal()
        t = Signal(CYCLE_BITS)
        pc = Signal(iw)
        halted = Signal()           # HALT dispatched in an earlier cycle
        active = Signal()           # the weight bank MATMULs use
        bank_free = [Signal(CYCLE_BITS, name=f"bank_free{b}") for b in range(2)]
        preload_done = Signal(CYCLE_BITS)
        vx_done = Signal(CYCLE_BITS)
        unit_free = {u: Signal(CYCLE_BITS, name=f"free_{_unit_name(u)}") for u in UNITS}
        tok = {(a, b): Signal(tw, name=f"tok_{a.name}_{b.name}")
               for a in Engine for b in Engine if a != b}
        begin = self.start & ~running

        queues, inflight = [], []
        for e in Engine:
            q = Fifo(_QueueEntry(cfg), cfg.queue_depth)
            f = Fifo(_InflightEntry(cfg), cfg.retire_depth)
            m.submodules[f"queue_{e.name.lower()}"] = q
            m.submodules[f"inflight_{e.name.lower()}"] = f
            m.d.comb += [q.clear.eq(begin), f.clear.eq(begin)]
            queues.append(q)
            inflight.append(f)

        # ---- phase 1: retire ---------------------------------------------------------------
        ret = [Signal(name=f"retire_{e.name}") for e in Engine]
        for e in Engine:
            f = inflight[e]
            m.d.comb += [ret[e].eq(running & (f.level != 0) & (f.head.complete <= t)),
                         f.pop.eq(ret[e])]
        inc = {(a, b): ret[a] & inflight[a].head.signal[b] for (a, b) in tok}
        overflow = Signal()
        ovf_index = Signal(iw)
        for (a, b), cnt in reversed(tok.items()):  # the first engine's overflow is reported
            with m.If(inc[a, b] & (cnt == cfg.token_max)):
                m.d.comb += [overflow.eq(1), ovf_index.eq(inflight[a].head.index)]
        any_ret = comb_signal(m, _or(ret))

        # After retirement: has the program ended, or reached the cycle limit?
        # Pending = dispatched and not retired: queued, or in flight after this retirement.
        left = [comb_signal(m, inflight[e].level - ret[e], f"left_{e.name}") for e in Engine]
        pending = comb_signal(m, _or([(queues[e].level != 0) | (left[e] != 0) for e in Engine]))
        end_now = comb_signal(m, running & ~overflow & halted & ~pending)
        limit_now = comb_signal(m, running & ~overflow & ~end_now & (t >= self.watchdog))
        # The oldest pending instruction: an engine's next in flight (its second entry when the
        # head retires now), else its queue head.
        candidates = [(left[e] != 0, Mux(ret[e], inflight[e].head2.index,
                                         inflight[e].head.index)) for e in Engine]
        candidates += [(queues[e].level != 0, queues[e].head.index) for e in Engine]
        oldest = _min_index(m, candidates, pc)
        go = comb_signal(m, running & ~overflow & ~end_now & ~limit_now)  # phases 2, 3 run

        # ---- phase 2: start ----------------------------------------------------------------
        st = [Signal(name=f"start_{e.name}") for e in Engine]
        hds = []
        for e in Engine:
            q = queues[e]
            word = q.head.word
            m.submodules[f"head_{e.name.lower()}"] = hd = HeadDecoder(cfg, e)
            m.d.comb += hd.word.eq(word)
            hds.append(hd)
            busy, lat = hd.busy, hd.latency
            unit_ok = Signal(name=f"unit_ok_{e.name}")
            m.d.comb += unit_ok.eq(1)
            for u in UNITS:
                with m.If(hd.unit == int(u)):
                    m.d.comb += unit_ok.eq(t >= unit_free[u])
            tok_ok: Value = Const(1)
            for w in Engine:
                if w != e:
                    tok_ok = tok_ok & (~hd.wait[w] | (tok[w, e] != 0) | inc[w, e])
            room = left[e] < cfg.retire_depth
            extra: Value = Const(1)
            if e == Engine.EX:
                shadow_free = Mux(active, bank_free[0], bank_free[1])
                extra = Mux(hd.preload, t >= shadow_free,
                            Mux(hd.matmul & hd.swap, t >= preload_done, 1))
            if e == Engine.VX:
                extra = Mux(hd.eltwise, t >= vx_done, 1)
            tok_ok = comb_signal(m, tok_ok, f"tokens_ok_{e.name}")
            extra = comb_signal(m, extra, f"bank_ok_{e.name}")
            m.d.comb += st[e].eq(go & (q.level != 0) & unit_ok & tok_ok & room & extra)
            complete = comb_signal(m, (t + lat)[:CYCLE_BITS], f"complete_{e.name}")
            m.d.comb += [q.pop.eq(st[e]), inflight[e].push.eq(st[e]),
                         inflight[e].data.complete.eq(complete),
                         inflight[e].data.signal.eq(hd.signal),
                         inflight[e].data.index.eq(q.head.index)]
            # Hand the instruction to its unit.
            for op in ENGINE_OPS[e]:
                unit = isa.OPCODE_UNIT[op]
                port = self.unit_port(unit)
                m.d.comb += [port.payload.word.eq(word), port.payload.index.eq(q.head.index),
                             port.payload.cycle.eq(t)]
                with m.If(st[e] & (hd.unit == int(unit))):
                    m.d.comb += port.valid.eq(1)
                    m.d.sync += unit_free[unit].eq(t + busy)
            if e == Engine.EX:
                use = Mux(hd.swap, ~active, active)
                m.d.comb += [self.unit_port(Unit.EX_WEIGHTS).payload.bank.eq(~active),
                             self.unit_port(Unit.EX_ARRAY).payload.bank.eq(use)]
                with m.If(st[e] & hd.matmul):
                    m.d.sync += active.eq(use)
                    for bk in range(2):
                        with m.If((use == bk) & (bank_free[bk] < complete)):
                            m.d.sync += bank_free[bk].eq(complete)
                with m.If(st[e] & hd.preload):
                    m.d.sync += preload_done.eq(complete)
            if e == Engine.VX:
                # As the contract: the latest completion of any VX instruction started so far
                # dates the next ELTWISE (a SYNC completes before an earlier VECTOR does).
                with m.If(st[e] & (vx_done < complete)):
                    m.d.sync += vx_done.eq(complete)
        any_st = comb_signal(m, _or(st))

        # Tokens: + on retirement of the giver, - on start of the taker.
        for (a, b), cnt in tok.items():
            m.d.sync += cnt.eq(cnt + inc[a, b] - (st[b] & hds[b].wait[a]))

        # ---- phase 3: dispatch -------------------------------------------------------------
        m.submodules.dispatch = dd = DispatchDecoder(cfg)
        m.d.comb += [dd.word.eq(self.imem.data), dd.pc.eq(pc), dd.n_instr.eq(self.n_instr),
                     dd.dram_bytes.eq(self.dram_bytes)]
        word = self.imem.data
        legal, addr_ok, eng = dd.legal, dd.address_ok, dd.engine
        can = go & ~halted
        illegal = can & ~legal
        bad_addr = can & legal & ~addr_ok
        is_halt, is_barrier = dd.halt, dd.barrier
        disp = Signal()
        pushes = [Signal(name=f"push_{e.name}") for e in Engine]
        with m.If(can & legal & addr_ok):
            with m.If(is_halt):
                m.d.comb += disp.eq(1)
            with m.Elif(is_barrier):
                # Everything before it retired: nothing queued, nothing left in flight (an
                # instruction starting now was queued).
                m.d.comb += disp.eq(~pending)
            with m.Else():
                for e in Engine:
                    space = (queues[e].level - st[e]) < cfg.queue_depth
                    with m.If((eng == e) & space):
                        m.d.comb += [disp.eq(1), pushes[e].eq(1)]
        for e in Engine:
            m.d.comb += [queues[e].push.eq(pushes[e]), queues[e].data.word.eq(word),
                         queues[e].data.index.eq(pc)]
        pc_next = Mux(disp, pc + 1, pc)
        m.d.comb += self.imem.addr.eq(Mux(running, pc_next, 0))

        # ---- end of cycle: deadlock --------------------------------------------------------
        inflight_after = _or([(left[e] + st[e]) != 0 for e in Engine])
        deadlock = comb_signal(m, go & ~any_ret & ~any_st & ~disp & ~inflight_after)
        queued_min = _min_index(m, [(queues[e].level != 0, queues[e].head.index) for e in Engine],
                                pc)

        # ---- state update ------------------------------------------------------------------
        # A fault stops the machine. The contract dates a bad GATHER index at the GATHER's start,
        # but the LD unit sees the index only when it has read it: a fault raised while a GATHER
        # is still checking its indices is held until the GATHER has finished them, and the
        # GATHER's fault (which happened first) replaces it if there is one.
        status = self.status
        held = Signal()
        held_code, held_cycle, held_index = Signal(3), Signal(CYCLE_BITS), Signal(iw)

        def report(code: Value | int, cycle: Value, index: Value) -> None:
            m.d.sync += [running.eq(0), held.eq(0), status.fault.eq(1), status.code.eq(code),
                         status.fault_cycle.eq(cycle), status.fault_index.eq(index),
                         status.cycles.eq(cycle)]

        def fault(code: Fault, cycle: Value, index: Value) -> None:
            with m.If(self.gather_busy):
                m.d.sync += [running.eq(0), held.eq(1), held_code.eq(int(code)),
                             held_cycle.eq(cycle), held_index.eq(index)]
            with m.Else():
                report(int(code), cycle, index)

        with m.If(begin):
            m.d.sync += [running.eq(1), t.eq(0), pc.eq(0), halted.eq(0), active.eq(0),
                         preload_done.eq(0), vx_done.eq(0), held.eq(0),
                         status.done.eq(0), status.fault.eq(0), status.code.eq(0),
                         status.fault_cycle.eq(0), status.fault_index.eq(0),
                         status.cycles.eq(0)]
            m.d.sync += [b.eq(0) for b in bank_free]
            m.d.sync += [u.eq(0) for u in unit_free.values()]
            m.d.sync += [c.eq(0) for c in tok.values()]
        with m.Elif(running):
            m.d.sync += [t.eq(t + 1), pc.eq(pc_next)]
            with m.If(disp & is_halt):
                m.d.sync += halted.eq(1)
            with m.If(self.gather_fault.valid):  # dated at the GATHER's start: first
                report(int(Fault.ADDRESS_OUT_OF_RANGE), self.gather_fault.cycle,
                       self.gather_fault.index)
            with m.Elif(overflow):
                fault(Fault.TOKEN_OVERFLOW, t, ovf_index)
            with m.Elif(end_now):
                m.d.sync += [running.eq(0), status.done.eq(1), status.cycles.eq(t)]
            with m.Elif(limit_now):
                fault(Fault.WATCHDOG, t, oldest)
            with m.Elif(illegal):
                fault(Fault.ILLEGAL_INSTRUCTION, t, pc)
            with m.Elif(bad_addr):
                fault(Fault.ADDRESS_OUT_OF_RANGE, t, pc)
            with m.Elif(deadlock):
                fault(Fault.TOKEN_DEADLOCK, t, queued_min)
        with m.Elif(held):
            with m.If(self.gather_fault.valid):
                report(int(Fault.ADDRESS_OUT_OF_RANGE), self.gather_fault.cycle,
                       self.gather_fault.index)
            with m.Elif(~self.gather_busy):
                report(held_code, held_cycle, held_index)
        m.d.comb += status.running.eq(running)

        # ---- trace -------------------------------------------------------------------------
        tr = self.trace
        m.d.comb += [tr.cycle.eq(t), tr.dispatch.valid.eq(disp), tr.dispatch.index.eq(pc),
                     tr.dispatch.barrier.eq(is_halt | is_barrier)]
        for e in Engine:
            seen = Signal(name=f"seen_{e.name}")
            head_valid = go & (queues[e].level != 0)
            m.d.sync += seen.eq(Mux(st[e] | begin, 0, seen | head_valid))
            m.d.comb += [tr.ready[e].valid.eq(head_valid & ~seen),
                         tr.ready[e].index.eq(queues[e].head.index),
                         tr.start[e].valid.eq(st[e]), tr.start[e].index.eq(queues[e].head.index),
                         tr.start[e].complete.eq(inflight[e].data.complete),
                         tr.retire[e].valid.eq(ret[e]),
                         tr.retire[e].index.eq(inflight[e].head.index)]
        return m


def _min_index(m: Module, candidates: list[tuple[Value, Value]], default: Value) -> Value:
    """The smallest index among the valid candidates, or ``default`` when none is valid."""
    best: Value = Value.cast(default)
    have: Value = Const(0)
    for valid, idx in candidates:
        better = valid & (~have | (idx < best))
        best = comb_signal(m, Mux(better, idx, best))
        have = comb_signal(m, have | valid)
    return best


def _or(values: list[Value]) -> Value:
    out: Value = Const(0)
    for v in values:
        out = out | v
    return out


def _and(values: list[Value]) -> Value:
    out: Value = Const(1)
    for v in values:
        out = out & v
    return out
