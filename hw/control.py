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
from .common import CYCLE_BITS, FaultLayout, Fifo, index_bits, start_signature
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
            "trace": Out(TraceLayout(cfg)),
        }
        for u in UNITS:
            members[_unit_name(u)] = Out(start_signature(cfg))
        super().__init__(members)

    def unit_port(self, unit: Unit) -> Any:
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
        heads = [data.View(decode.HEADER_LAYOUT, queues[e].head.word) for e in Engine]

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
        any_ret = _or(ret)

        # After retirement: has the program ended, or reached the cycle limit?
        # Pending = dispatched and not retired: queued, or in flight after this retirement.
        left = [(inflight[e].level - ret[e]) for e in Engine]
        pending = _or([(queues[e].level != 0) | (left[e] != 0) for e in Engine])
        end_now = running & ~overflow & halted & ~pending
        limit_now = running & ~overflow & ~end_now & (t >= self.watchdog)
        oldest = _min_index(
            [(left[e] != 0, Mux(ret[e], inflight[e].head2.index, inflight[e].head.index))
             for e in Engine] + [(queues[e].level != 0, queues[e].head.index) for e in Engine],
            pc)
        go = running & ~overflow & ~end_now & ~limit_now   # phases 2 and 3 run

        # ---- phase 2: start ----------------------------------------------------------------
        st = [Signal(name=f"start_{e.name}") for e in Engine]
        for e in Engine:
            q = queues[e]
            word = q.head.word
            hdr = heads[e]
            opc = hdr.opcode
            busy, lat = Value.cast(1), Value.cast(1)            # SYNC
            unit_ok: Value = Const(1)
            for op in ENGINE_OPS[e]:
                b, lt = decode.timing(op, word, cfg)
                busy, lat = Mux(opc == int(op), b, busy), Mux(opc == int(op), lt, lat)
                unit_ok = Mux(opc == int(op), t >= unit_free[isa.OPCODE_UNIT[op]], unit_ok)
            tok_ok: Value = Const(1)
            for w in Engine:
                if w != e:
                    tok_ok = tok_ok & (~hdr.wait[w] | (tok[w, e] != 0) | inc[w, e])
            room = left[e] < cfg.retire_depth
            extra: Value = Const(1)
            if e == Engine.EX:
                mm = decode.view(Opcode.MATMUL, word)
                shadow_free = Mux(active, bank_free[0], bank_free[1])
                extra = Mux(opc == int(Opcode.PRELOAD), t >= shadow_free,
                            Mux((opc == int(Opcode.MATMUL)) & mm.swap, t >= preload_done, 1))
            if e == Engine.VX:
                extra = Mux(opc == int(Opcode.ELTWISE), t >= vx_done, 1)
            m.d.comb += st[e].eq(go & (q.level != 0) & unit_ok & tok_ok & room & extra)
            complete = (t + lat)[:CYCLE_BITS]
            m.d.comb += [q.pop.eq(st[e]), inflight[e].push.eq(st[e]),
                         inflight[e].data.complete.eq(complete),
                         inflight[e].data.signal.eq(hdr.signal),
                         inflight[e].data.index.eq(q.head.index)]
            # Hand the instruction to its unit.
            for op in ENGINE_OPS[e]:
                unit = isa.OPCODE_UNIT[op]
                port = self.unit_port(unit)
                m.d.comb += [port.payload.word.eq(word), port.payload.index.eq(q.head.index),
                             port.payload.cycle.eq(t)]
                with m.If(st[e] & (opc == int(op))):
                    m.d.comb += port.valid.eq(1)
                    m.d.sync += unit_free[unit].eq(t + busy)
            if e == Engine.EX:
                mm = decode.view(Opcode.MATMUL, word)
                use = Mux(mm.swap, ~active, active)
                m.d.comb += [self.unit_port(Unit.EX_WEIGHTS).payload.bank.eq(~active),
                             self.unit_port(Unit.EX_ARRAY).payload.bank.eq(use)]
                with m.If(st[e] & (opc == int(Opcode.MATMUL))):
                    m.d.sync += active.eq(use)
                    for bk in range(2):
                        with m.If((use == bk) & (bank_free[bk] < complete)):
                            m.d.sync += bank_free[bk].eq(complete)
                with m.If(st[e] & (opc == int(Opcode.PRELOAD))):
                    m.d.sync += preload_done.eq(complete)
            if e == Engine.VX:
                # As the contract: the latest VX start (SYNC included) dates the next ELTWISE.
                with m.If(st[e]):
                    m.d.sync += vx_done.eq(complete)
        any_st = _or(st)

        # Tokens: + on retirement of the giver, - on start of the taker.
        for (a, b), cnt in tok.items():
            m.d.sync += cnt.eq(cnt + inc[a, b] - (st[b] & heads[b].wait[a]))

        # ---- phase 3: dispatch -------------------------------------------------------------
        word = self.imem.data
        opc = data.View(decode.HEADER_LAYOUT, word).opcode
        legal = decode.legal(word) & (pc < self.n_instr)
        addr_ok = decode.address_ok(word, cfg, self.dram_bytes)
        eng = decode.engine_of(word)
        can = go & ~halted
        illegal = can & ~legal
        bad_addr = can & legal & ~addr_ok
        is_halt, is_barrier = opc == int(Opcode.HALT), opc == int(Opcode.BARRIER)
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
        deadlock = go & ~any_ret & ~any_st & ~disp & ~inflight_after
        queued_min = _min_index([(queues[e].level != 0, queues[e].head.index) for e in Engine],
                                pc)

        # ---- state update ------------------------------------------------------------------
        status = self.status
        with m.If(begin):
            m.d.sync += [running.eq(1), t.eq(0), pc.eq(0), halted.eq(0), active.eq(0),
                         preload_done.eq(0), vx_done.eq(0),
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

            def fault(code: Fault, cycle: Value, index: Value) -> None:
                m.d.sync += [running.eq(0), status.fault.eq(1), status.code.eq(int(code)),
                             status.fault_cycle.eq(cycle), status.fault_index.eq(index),
                             status.cycles.eq(cycle)]

            with m.If(self.gather_fault.valid):  # dated at the GATHER's start: first
                fault(Fault.ADDRESS_OUT_OF_RANGE, self.gather_fault.cycle,
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


def _min_index(candidates: list[tuple[Value, Value]], default: Value) -> Value:
    """The smallest index among the valid candidates, or ``default`` when none is valid."""
    best: Value = Value.cast(default)
    have: Value = Const(0)
    for valid, idx in candidates:
        better = valid & (~have | (idx < best))
        best = Mux(better, idx, best)
        have = have | valid
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
