"""Instruction decoding for the RTL, generated from :mod:`npu.isa` (never retyped).

* :data:`INSTR_LAYOUTS`: one Amaranth :class:`~amaranth.lib.data.FlexibleLayout` per opcode,
  built from ``npu.isa.LAYOUTS`` (each Field's lsb, width and signedness);
* :func:`legal`: the hardware form of "``npu.isa.decode`` accepts this word" (known opcode, no
  reserved bit set, token masks that do not name the own engine, none on BARRIER/HALT);
* :func:`timing`: busy and latency as Amaranth expressions, obtained by evaluating the contract's
  formula strings (``npu.isa.TIMING``) over the instruction's fields;
* :func:`address_ok`: the hardware form of ``npu.isa.address_error(...) is None``, the dispatch
  time ADDRESS_OUT_OF_RANGE check (its equivalence is tested on random instructions).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from amaranth.hdl import Const, Mux, Value, signed, unsigned
from amaranth.lib import data
from amaranth.utils import exact_log2

from npu import isa
from npu.isa import Mem, NPUConfig, Opcode

__all__ = ["INSTR_LAYOUTS", "HEADER_LAYOUT", "USED_BITS", "field_shape", "view", "opcode_of",
           "is_op", "legal", "timing", "address_ok", "engine_of", "unit_of"]

#: Instruction header fields present in every layout.
HEADER_FIELDS = ("opcode", "wait", "signal")


def field_shape(f: isa.Field) -> Any:
    """Amaranth shape of one ISA field."""
    return signed(f.width) if f.signed else unsigned(f.width)


def _layout(fields: dict[str, isa.Field]) -> data.FlexibleLayout:
    return data.FlexibleLayout(isa.INSTR_BITS, {
        name: data.Field(field_shape(f), f.lsb) for name, f in fields.items()})


#: Per-opcode view of a 256-bit instruction word.
INSTR_LAYOUTS: dict[Opcode, data.FlexibleLayout] = {
    op: _layout(fields) for op, fields in isa.LAYOUTS.items()}
#: The common header (opcode, wait, signal), valid for every word.
HEADER_LAYOUT = _layout({k: isa.LAYOUTS[Opcode.HALT][k] for k in HEADER_FIELDS})
#: Bits that each opcode's fields occupy; every other bit is reserved and must be 0.
USED_BITS: dict[Opcode, int] = {
    op: sum(((1 << f.width) - 1) << f.lsb for f in fields.values())
    for op, fields in isa.LAYOUTS.items()}


def view(op: Opcode, word: Value) -> data.View:
    """The fields of ``word`` as if it held opcode ``op``."""
    return data.View(INSTR_LAYOUTS[op], word)


def opcode_of(word: Value) -> Value:
    return data.View(HEADER_LAYOUT, word).opcode


def is_op(word: Value, *ops: Opcode) -> Value:
    """1 when the word's opcode is one of ``ops``."""
    opc = opcode_of(word)
    out = Const(0)
    for op in ops:
        out = out | (opc == int(op))
    return out


def engine_of(word: Value) -> Value:
    """Engine (2 bits) executing a legal non-BARRIER/HALT word (SYNC: its ``engine`` field)."""
    opc = opcode_of(word)
    out: Value = view(Opcode.SYNC, word).engine
    for op, eng in isa.OPCODE_ENGINE.items():
        if eng is not None:
            out = Mux(opc == int(op), int(eng), out)
    return out


def unit_of(word: Value) -> Value:
    """Functional unit (``npu.isa.Unit``) of a legal word."""
    opc = opcode_of(word)
    out: Value = Const(int(isa.Unit.NONE), 3)
    for op, unit in isa.OPCODE_UNIT.items():
        out = Mux(opc == int(op), int(unit), out)
    return out


def legal(word: Value) -> Value:
    """1 when ``npu.isa.decode`` would accept the word: a known opcode, no reserved bit set,
    enumerated fields within their maximum, token masks that do not name the own engine."""
    hdr = data.View(HEADER_LAYOUT, word)
    ok: Value = Const(0)
    for op in Opcode:
        reserved = (word & ((1 << isa.INSTR_BITS) - 1 - USED_BITS[op])) == 0
        eng = isa.OPCODE_ENGINE[op]
        if op == Opcode.SYNC:
            e = view(op, word).engine
            masks = ~(hdr.wait.bit_select(e, 1) | hdr.signal.bit_select(e, 1))
        elif eng is None:
            masks = (hdr.wait == 0) & (hdr.signal == 0)
        else:
            masks = ~(hdr.wait[int(eng)] | hdr.signal[int(eng)])
        fields = view(op, word)
        for name, f in isa.LAYOUTS[op].items():
            # Enumerations narrower than their field (none since ELTWISE.func became 1 bit; a
            # check of a field's own maximum would be a constant Verilator warns about).
            if f.maximum is not None and f.maximum < (1 << f.width) - 1:
                masks = masks & (fields[name] <= f.maximum)
        ok = ok | ((hdr.opcode == int(op)) & reserved & masks)
    return ok


# --------------------------------------------------------------------------------------------
# Timing formulas, evaluated over Amaranth values
# --------------------------------------------------------------------------------------------

def _cdiv(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    if isinstance(b, int) and b > 0 and b & (b - 1) == 0:
        return (Value.cast(a) + (b - 1)) >> exact_log2(b)
    return (Value.cast(a) + (Value.cast(b) - 1)) // b


def _where(cond: Any, a: Any, b: Any) -> Any:
    if isinstance(cond, int):
        return a if cond else b
    return Mux(cond, a, b)


def timing(op: Opcode, word: Value, cfg: NPUConfig) -> tuple[Value, Value]:
    """``(busy, latency)`` of ``word`` read as ``op``: the formulas of ``npu.isa.TIMING``."""
    busy_src, lat_src = isa.TIMING[op]
    fields = view(op, word)
    ns: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                          if isinstance(getattr(cfg, f.name), int)}
    ns.update({name: fields[name] for name in isa.LAYOUTS[op] if name not in HEADER_FIELDS})
    ns.update(cdiv=_cdiv, where=_where, __builtins__={})
    busy = eval(busy_src, ns)  # noqa: S307 - the contract's own constant formulas
    ns["busy"] = busy
    latency = eval(lat_src, ns)  # noqa: S307
    return Value.cast(busy), Value.cast(latency)


# --------------------------------------------------------------------------------------------
# Static address check (isa.address_error in hardware form)
# --------------------------------------------------------------------------------------------

def _unsigned_fields() -> None:
    # address_ok relies on every address, stride and count being unsigned (no negative ranges).
    for op, fields in isa.LAYOUTS.items():
        for name, f in fields.items():
            if f.signed and any(k in name for k in ("addr", "stride", "n_", "row", "dst", "src")):
                raise AssertionError(f"{op.name}.{name} is signed; address_ok assumes unsigned")


_unsigned_fields()


def address_ok(word: Value, cfg: NPUConfig, dram_bytes: Value) -> Value:
    """1 when ``npu.isa.address_error`` finds nothing wrong with the (legal) word.

    Addresses and strides are unsigned, so every range starts at >= 0 and only its end is checked
    against the memory size; the last row of a 2-D range is the largest address.
    """
    opc = opcode_of(word)
    spad, acc = cfg.spad_rows, cfg.acc_rows
    checks: list[tuple[Opcode, Value]] = []

    def rows_of(mem: Value) -> Value:
        return Mux(mem == int(Mem.ACC), acc, spad)

    def row_bytes_ok(f: data.View) -> Value:
        return (f.row_bytes >= 1) & (f.row_bytes <= Mux(f.mem == int(Mem.ACC), cfg.acc_row_bytes,
                                                         cfg.spad_row_bytes))

    for op in (Opcode.LOAD, Opcode.STORE):
        f = view(op, word)
        local = "dst" if op == Opcode.LOAD else "src"
        counts = (f.n_inner >= 1) & (f.n_outer >= 1) & row_bytes_ok(f)
        local_end = f[local] + (f.n_outer - 1) * f[f"{local}_stride_outer"] + f.n_inner
        dram_end = (f.dram_addr + (f.n_outer - 1) * f.dram_stride_outer
                    + (f.n_inner - 1) * f.dram_stride_inner + f.row_bytes)
        dram_ok = dram_end <= dram_bytes
        if op == Opcode.LOAD:
            dram_ok = f.fill | dram_ok
        checks.append((op, counts & (local_end <= rows_of(f.mem)) & dram_ok))
    f = view(Opcode.GATHER, word)
    checks.append((Opcode.GATHER, (f.n >= 1) & (f.n <= cfg.gather_max) & row_bytes_ok(f)
                   & (f.dst + f.n <= rows_of(f.mem)) & (f.index_addr + 4 * f.n <= dram_bytes)))
    f = view(Opcode.PRELOAD, word)
    checks.append((Opcode.PRELOAD, f.spad_addr + cfg.rows <= spad))
    f = view(Opcode.MATMUL, word)
    last = (f.spad_addr + (f.n_outer - 1) * f.spad_stride_outer
            + (f.n_inner - 1) * f.spad_stride_inner)
    checks.append((Opcode.MATMUL, (f.n_inner >= 1) & (f.n_outer >= 1) & (last < spad)
                   & (f.acc_addr + f.n_inner * f.n_outer <= acc)))
    f = view(Opcode.VECTOR, word)
    checks.append((Opcode.VECTOR, (f.n >= 1) & (f.acc_addr + f.n <= acc)
                   & (f.param_addr + isa.VECTOR_PARAM_ROWS <= acc) & (f.spad_addr + f.n <= spad)))
    f = view(Opcode.ELTWISE, word)
    n = f.n_inner * f.n_outer
    ok = (f.n_inner >= 1) & (f.n_outer >= 1) & (f.dst + n <= spad)
    for src in ("a", "b"):
        addr, so, si = f[f"{src}_addr"], f[f"{src}_stride_outer"], f[f"{src}_stride_inner"]
        last = addr + (f.n_outer - 1) * so + (f.n_inner - 1) * si
        # The destination coincides with the operand element for element, or misses it.
        same = ((addr == f.dst) & ((f.n_inner == 1) | (si == 1))
                & ((f.n_outer == 1) | (so == f.n_inner)))
        overlap = (addr < f.dst + n) & (f.dst <= last)
        ok = ok & (last < spad) & (same | ~overlap)
    checks.append((Opcode.ELTWISE, ok))

    out: Value = Const(1)
    for op, ok in checks:
        out = Mux(opc == int(op), ok, out)
    return out
