"""Small building blocks shared by the NPU's components: a fixed delay line, a FIFO with
explicit push/pop, the payload that starts a unit, and the integer arithmetic of
:mod:`npu.numerics` in hardware form (round half to even, clamp, int8 saturation)."""

from __future__ import annotations

from typing import Any

from amaranth.hdl import Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from npu import isa
from npu.isa import NPUConfig
from npu.numerics import INT8_MAX, INT8_MIN

__all__ = ["comb_signal", "CYCLE_BITS", "index_bits", "StartLayout", "start_signature",
           "FaultLayout", "DelayLine", "Fifo", "round_shift", "clamp_int8", "wrap32", "spad_row",
           "acc_row", "mem_signatures", "Walk"]

#: Width of cycle numbers (the cycle counter, completion cycles, unit-free cycles).
CYCLE_BITS = 48


def comb_signal(m: Module, expr: Any, name: str | None = None) -> Signal:
    """A signal driven combinationally by ``expr``. Naming intermediate results keeps expression
    trees shallow (Amaranth's simulator compiles deep trees slowly) and the Verilog readable."""
    value = Value.cast(expr)
    sig = Signal(value.shape(), name=name)
    m.d.comb += sig.eq(value)
    return sig


def index_bits(cfg: NPUConfig) -> int:
    """Bits of an instruction index; one more than the imem address so that `pc` can name the
    position just past the end of a full instruction memory."""
    return ceil_log2(cfg.imem_depth) + 1


class StartLayout(data.StructLayout):
    """What the control hands a functional unit when one of its instructions starts: the word,
    its index and start cycle (for faults), and the weight bank it uses (EX only)."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({"word": unsigned(isa.INSTR_BITS), "index": unsigned(index_bits(cfg)),
                          "cycle": unsigned(CYCLE_BITS), "bank": unsigned(1)})


class FaultLayout(data.StructLayout):
    """A fault a unit found after the start of its instruction (GATHER's bad index)."""

    def __init__(self, cfg: NPUConfig) -> None:
        super().__init__({"valid": 1, "index": unsigned(index_bits(cfg)),
                          "cycle": unsigned(CYCLE_BITS)})


def start_signature(cfg: NPUConfig) -> stream.Signature:
    """Control -> unit: an instruction starts. Always ready: the timing contract guarantees the
    unit is free (its busy cycles have elapsed), so there is no back-pressure."""
    return stream.Signature(StartLayout(cfg), always_ready=True)


class DelayLine(wiring.Component):
    """``o`` at cycle t is ``i`` at cycle ``t - delay``. Long delays use a memory ring buffer
    (one write and one read per cycle) instead of a shift register; it starts at zero."""

    def __init__(self, shape: Any, delay: int, *, ring_from: int = 4) -> None:
        if delay < 0:
            raise ValueError(f"DelayLine delay must be >= 0, got {delay}")
        self._shape, self._delay, self._ring = shape, delay, delay >= ring_from
        super().__init__({"i": In(shape), "o": Out(shape)})

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        width = Shape.cast(self._shape).width if not isinstance(self._shape, data.Layout) \
            else self._shape.size
        i_raw, o_raw = Value.cast(self.i), Value.cast(self.o)
        if self._delay == 0:
            m.d.comb += o_raw.eq(i_raw)
        elif not self._ring:
            prev = i_raw
            for k in range(self._delay):
                stage = Signal(width, name=f"stage{k}")
                m.d.sync += stage.eq(prev)
                prev = stage
            m.d.comb += o_raw.eq(prev)
        else:
            # Slot wp is written at cycle t; the sync read issued at t (slot wp+1, written at
            # t - delay + 1) returns at t + 1 the value written delay cycles before it.
            m.submodules.ring = ring = memory.Memory(shape=width, depth=self._delay, init=[])
            wr, rd = ring.write_port(), ring.read_port()
            wp = Signal(range(self._delay))
            # The ring's contents are undefined after reset (an SRAM): output zero until it has
            # been written all round once.
            primed = Signal()
            m.d.sync += wp.eq(Mux(wp == self._delay - 1, 0, wp + 1))
            with m.If(wp == self._delay - 1):
                m.d.sync += primed.eq(1)
            m.d.comb += [wr.addr.eq(wp), wr.data.eq(i_raw), wr.en.eq(1),
                         rd.addr.eq(Mux(wp == self._delay - 1, 0, wp + 1)),
                         o_raw.eq(Mux(primed, rd.data, 0))]
        return m


class Fifo(wiring.Component):
    """In-order queue with explicit ``push``/``pop`` (both allowed in one cycle, even when full,
    which the dispatch rule needs: space is counted after the start phase; ``clear`` empties it).
    ``head`` is the oldest entry, valid when ``level > 0``, ``head2`` the next one (``level >
    1``); pushing into a full queue without popping and popping an empty one are the caller's
    errors (the control never does either)."""

    def __init__(self, shape: Any, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"Fifo depth must be >= 1, got {depth}")
        self._shape, self._depth = shape, depth
        super().__init__({"push": In(1), "data": In(shape), "pop": In(1), "clear": In(1),
                          "head": Out(shape), "head2": Out(shape),
                          "level": Out(range(depth + 1))})

    def elaborate(self, platform: Any) -> Module:
        m = Module()
        d = self._depth
        m.submodules.store = store = memory.Memory(shape=self._shape, depth=d, init=[])
        wr, rd = store.write_port(), store.read_port(domain="comb")
        rd2 = store.read_port(domain="comb")
        rp, wp = Signal(range(d)), Signal(range(d))

        def inc(p: Signal) -> Value:
            return Mux(p == d - 1, 0, p + 1)

        m.d.comb += [wr.addr.eq(wp), wr.data.eq(self.data), wr.en.eq(self.push),
                     rd.addr.eq(rp), self.head.eq(rd.data),
                     rd2.addr.eq(inc(rp)), self.head2.eq(rd2.data)]
        with m.If(self.push):
            m.d.sync += wp.eq(inc(wp))
        with m.If(self.pop):
            m.d.sync += rp.eq(inc(rp))
        m.d.sync += self.level.eq(self.level + self.push - self.pop)
        with m.If(self.clear):
            m.d.sync += [wp.eq(0), rp.eq(0), self.level.eq(0)]
        return m


# --------------------------------------------------------------------------------------------
# Arithmetic of npu.numerics
# --------------------------------------------------------------------------------------------

def wrap32(x: Value) -> Value:
    """Two's-complement wrap to int32."""
    return Value.cast(x)[:32].as_signed()


def round_shift(m: Module, x: Value, shift: Value) -> Value:
    """``numerics.round_shift``: ``x / 2**shift`` rounded half to even (``shift`` in [0, 63])."""
    x = Value.cast(x)
    assert x.shape().signed
    q = comb_signal(m, x >> shift)                           # arithmetic shift: floor
    r = comb_signal(m, (x - (q << shift)).as_unsigned()[:len(x)])   # in [0, 2**shift)
    half = comb_signal(m, (Value.cast(1) << (shift - 1)[:len(shift)])[:len(x)])
    up = (shift != 0) & ((r > half) | ((r == half) & q[0]))  # half: garbage when shift == 0
    # shift >= len(x): r and half no longer fit len(x) bits, and |x| < 2**(shift-1) rounds to 0.
    return comb_signal(m, Mux(shift >= len(x), 0, q + up))


def clamp_int8(m: Module, y: Value, lo: Value, hi: Value) -> Value:
    """``numerics.clamp``: ``min(max(y, lo), hi)`` then saturate to int8."""
    y = Value.cast(y)
    a = comb_signal(m, Mux(y < lo, lo, y))
    b = comb_signal(m, Mux(a > hi, hi, a))
    c = Mux(b < INT8_MIN, INT8_MIN, Mux(b > INT8_MAX, INT8_MAX, b))
    return comb_signal(m, c[:8].as_signed())


# --------------------------------------------------------------------------------------------
# Local memories and address walks
# --------------------------------------------------------------------------------------------

def spad_row(cfg: NPUConfig) -> data.ArrayLayout:
    """A SPAD row: ``cols`` int8."""
    return data.ArrayLayout(signed(8), cfg.cols)


def acc_row(cfg: NPUConfig) -> data.ArrayLayout:
    """An ACC row: ``cols`` int32."""
    return data.ArrayLayout(signed(32), cfg.cols)


def mem_signatures(cfg: NPUConfig) -> dict[str, Any]:
    """Port signatures of SPAD and ACC, seen from a unit (flipped: the unit drives addresses)."""
    sa, aa = ceil_log2(cfg.spad_rows), ceil_log2(cfg.acc_rows)
    return {
        "spad_r": In(memory.ReadPort.Signature(addr_width=sa, shape=spad_row(cfg))),
        "spad_w": In(memory.WritePort.Signature(addr_width=sa, shape=spad_row(cfg))),
        "acc_r": In(memory.ReadPort.Signature(addr_width=aa, shape=acc_row(cfg))),
        "acc_w": In(memory.WritePort.Signature(addr_width=aa, shape=acc_row(cfg))),
    }


class Walk:
    """Nested loop counters of a unit's issue stage: ``n_outer`` runs of ``n_inner`` elements of
    ``beats`` cycles each, and any number of address streams ``base + o*outer + i*inner``.

    The first element is produced combinationally in the start cycle (``go``), the rest from
    registers while ``step`` is asserted, so an instruction issues from its start cycle on.
    Call :meth:`stream` for each address stream, then :meth:`build` once.
    """

    def __init__(self, m: Module, go: Value, n_inner: Value, n_outer: Value,
                 beats: Value | int = 1, *, width: int = 16, name: str = "walk") -> None:
        self.m, self.go, self._name = m, go, name
        self.n_inner, self.n_outer, self.beats = n_inner, n_outer, beats
        self._b, self._i, self._o = (Signal(width, name=f"{name}_{k}") for k in "bio")
        self.b = comb_signal(m, Mux(go, 0, self._b), f"{name}_b_now")
        self.i = comb_signal(m, Mux(go, 0, self._i), f"{name}_i_now")
        self.o = comb_signal(m, Mux(go, 0, self._o), f"{name}_o_now")
        self.last_beat = comb_signal(
            m, self.b == beats - 1 if not isinstance(beats, int) or beats != 1 else 1,
            f"{name}_last_beat")
        self.last_inner = comb_signal(m, self.i == n_inner - 1, f"{name}_last_inner")
        self.last_outer = comb_signal(m, self.o == n_outer - 1, f"{name}_last_outer")
        self.last = comb_signal(m, self.last_beat & self.last_inner & self.last_outer,
                                f"{name}_last")
        self._streams: list[tuple[Signal, Signal, Value, Value, Value]] = []

    def stream(self, base: Value, outer: Value, inner: Value | int, width: int) -> Value:
        """Current address of a stream (``base + o*outer + i*inner``, wrapping at ``width``)."""
        k = len(self._streams)
        cur = Signal(width, name=f"{self._name}_cur{k}")
        run = Signal(width, name=f"{self._name}_run{k}")
        cur_c = comb_signal(self.m, Mux(self.go, base, cur)[:width], f"{self._name}_cur{k}_now")
        run_c = comb_signal(self.m, Mux(self.go, base, run)[:width], f"{self._name}_run{k}_now")
        self._streams.append((cur, run, cur_c, run_c, (outer, inner)))
        return cur_c

    def build(self, step: Value) -> None:
        m = self.m
        with m.If(step):
            with m.If(self.last_beat):
                m.d.sync += self._b.eq(0)
                with m.If(self.last_inner):
                    m.d.sync += [self._i.eq(0), self._o.eq(self.o + 1)]
                    for cur, run, _cur_c, run_c, (outer, _inner) in self._streams:
                        m.d.sync += [run.eq(run_c + outer), cur.eq(run_c + outer)]
                with m.Else():
                    m.d.sync += [self._i.eq(self.i + 1), self._o.eq(self.o)]
                    for cur, run, cur_c, run_c, (_outer, inner) in self._streams:
                        m.d.sync += [cur.eq(cur_c + inner), run.eq(run_c)]
            with m.Else():
                m.d.sync += [self._b.eq(self.b + 1), self._i.eq(self.i), self._o.eq(self.o)]
                for cur, run, cur_c, run_c, _strides in self._streams:
                    m.d.sync += [cur.eq(cur_c), run.eq(run_c)]
