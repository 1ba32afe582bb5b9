"""Random valid, race-free NPU programs, programs that fault, and a race checker.

Used by the differential tests (numba engine against the reference interpreter), by the RTL
conformance corpus, and by anyone who wants to know whether a program's tokens order every
pair of instructions that touch the same memory:

* :func:`random_program` draws a valid program covering every instruction kind and field
  feature (2-D strides, fill, ACC targets, accumulate, swap, gathers, ELTWISE with coinciding
  destination, clamps, VECTOR with float32 scales (``fp32``; :func:`f32_scale_bits`), SYNC on
  every engine, BARRIER, random extra tokens), with boundary sizes
  (n = 1, full rows, the last SPAD/ACC row, the last DRAM byte). Tokens are added so that the
  program is race free and can neither deadlock nor overflow a token counter.
* :func:`random_inputs` draws values for a program's input bindings.
* :func:`fault_program` draws a program that faults with a given code.
* :func:`access_sets` and :func:`find_races` check race freedom independently of how a
  program was built (``find_races`` derives the happens-before order from tokens, in-order
  engines and barriers).
* :func:`program_strategy` wraps the generator for hypothesis.

Race freedom rule: when instruction *j* of engine B touches memory that an earlier
instruction *i* of engine A != B writes (or writes memory *i* reads), let *i'* be the last
instruction of A before *j*; unless *i'* already signals B, it gets ``signal B`` and *j* gets
``wait A``. Signals and waits between a pair of engines then pair up in program order, every
wait comes after its signal, so there is no deadlock, and a counter never holds more tokens
than the program has instructions (``n_instructions <= token_max`` is required).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from npu.isa import (
    LAYOUTS,
    VECTOR_PARAM_ROWS,
    Engine,
    Fault,
    Instr,
    Mem,
    NPUConfig,
    Opcode,
    address_error,
    encode,
    get_config,
    timing,
)
from npu.program import Binding, Program, Segment

__all__ = ["KINDS", "FP32_SHARE", "f32_scale_bits", "random_program", "random_inputs",
           "fault_program", "access_sets", "find_races", "program_strategy", "FAULT_KINDS"]

#: Instruction kinds the generator draws (HALT always ends a program).
KINDS: tuple[Opcode, ...] = (Opcode.LOAD, Opcode.GATHER, Opcode.PRELOAD, Opcode.MATMUL,
                             Opcode.VECTOR, Opcode.ELTWISE, Opcode.STORE, Opcode.SYNC,
                             Opcode.BARRIER)
_WEIGHT = {Opcode.LOAD: 3.0, Opcode.GATHER: 1.0, Opcode.PRELOAD: 1.5, Opcode.MATMUL: 2.0,
           Opcode.VECTOR: 1.5, Opcode.ELTWISE: 1.5, Opcode.STORE: 2.0, Opcode.SYNC: 1.0,
           Opcode.BARRIER: 0.3}
#: Share of VECTORs drawn with ``fp32=1`` (float32 scales in the multiplier row).
FP32_SHARE = 0.4
#: VECTOR parameter sets (bias, multiplier, shift rows) at the start of DRAM, loaded into ACC
#: by the first instruction: integer ones, then one of float32 scales (the last).
_PARAM_SETS = 3
_F32_SET = _PARAM_SETS - 1
#: ELTWISE's field layout: multipliers and shift are drawn over these fields' ranges.
_ELT_FIELDS = LAYOUTS[Opcode.ELTWISE]
#: Fault codes :func:`fault_program` can produce.
FAULT_KINDS: tuple[Fault, ...] = (Fault.ILLEGAL_INSTRUCTION, Fault.ADDRESS_OUT_OF_RANGE,
                                  Fault.TOKEN_DEADLOCK, Fault.WATCHDOG, Fault.TOKEN_OVERFLOW)

Sets = dict[str, set[int]]   # "dram" (bytes), "spad", "acc" (rows) -> addresses


# --------------------------------------------------------------------------------------------
# Memory footprints and the race checker
# --------------------------------------------------------------------------------------------

def _empty() -> Sets:
    return {"dram": set(), "spad": set(), "acc": set()}


def _rows(base: int, so: int, si: int, n_outer: int, n_inner: int) -> set[int]:
    return {base + o * so + i * si for o in range(n_outer) for i in range(n_inner)}


def _byte_runs(starts: Iterable[int], nbytes: int) -> set[int]:
    out: set[int] = set()
    for s in starts:
        out.update(range(s, s + nbytes))
    return out


def access_sets(instr: Instr, config: NPUConfig, dram: np.ndarray | None = None,
                dram_bytes: int | None = None) -> tuple[Sets, Sets]:
    """``(reads, writes)``: the DRAM bytes and SPAD/ACC rows ``instr`` reads and writes.

    GATHER's table rows depend on its indices: with ``dram`` (the DRAM image the indices are
    read from) they are exact, otherwise every byte from the table start to ``dram_bytes``.
    Weight banks are not listed (only EX touches them, in order).
    """
    f = instr.fields
    op = instr.opcode
    reads, writes = _empty(), _empty()
    local = ("spad", "acc")
    if op == Opcode.LOAD:
        writes[local[f["mem"]]] = _rows(f["dst"], f["dst_stride_outer"], 1, f["n_outer"],
                                         f["n_inner"])
        if not f["fill"]:
            reads["dram"] = _byte_runs(_rows(f["dram_addr"], f["dram_stride_outer"],
                                             f["dram_stride_inner"], f["n_outer"],
                                             f["n_inner"]), f["row_bytes"])
    elif op == Opcode.GATHER:
        n = f["n"]
        writes[local[f["mem"]]] = set(range(f["dst"], f["dst"] + n))
        reads["dram"] = set(range(f["index_addr"], f["index_addr"] + 4 * n))
        if dram is not None:
            idx = dram[f["index_addr"]:f["index_addr"] + 4 * n].copy().view("<i4")
            reads["dram"] |= _byte_runs((f["dram_addr"] + int(k) * f["row_stride"]
                                         for k in idx), f["row_bytes"])
        else:
            end = dram_bytes if dram_bytes is not None else f["dram_addr"] + f["row_bytes"]
            reads["dram"] |= set(range(f["dram_addr"], end))
    elif op == Opcode.PRELOAD:
        reads["spad"] = set(range(f["spad_addr"], f["spad_addr"] + config.rows))
    elif op == Opcode.MATMUL:
        reads["spad"] = _rows(f["spad_addr"], f["spad_stride_outer"], f["spad_stride_inner"],
                              f["n_outer"], f["n_inner"])
        writes["acc"] = set(range(f["acc_addr"], f["acc_addr"] + f["n_inner"] * f["n_outer"]))
        if f["accumulate"]:
            reads["acc"] = set(writes["acc"])
    elif op == Opcode.VECTOR:
        reads["acc"] = (set(range(f["acc_addr"], f["acc_addr"] + f["n"]))
                        | set(range(f["param_addr"], f["param_addr"] + VECTOR_PARAM_ROWS)))
        writes["spad"] = set(range(f["spad_addr"], f["spad_addr"] + f["n"]))
    elif op == Opcode.ELTWISE:
        reads["spad"] = (_rows(f["a_addr"], f["a_stride_outer"], f["a_stride_inner"],
                               f["n_outer"], f["n_inner"])
                         | _rows(f["b_addr"], f["b_stride_outer"], f["b_stride_inner"],
                                 f["n_outer"], f["n_inner"]))
        writes["spad"] = set(range(f["dst"], f["dst"] + f["n_inner"] * f["n_outer"]))
    elif op == Opcode.STORE:
        reads[local[f["mem"]]] = _rows(f["src"], f["src_stride_outer"], 1, f["n_outer"],
                                       f["n_inner"])
        writes["dram"] = _byte_runs(_rows(f["dram_addr"], f["dram_stride_outer"],
                                          f["dram_stride_inner"], f["n_outer"], f["n_inner"]),
                                    f["row_bytes"])
    return reads, writes


def _conflict(ri: Sets, wi: Sets, rj: Sets, wj: Sets) -> str | None:
    """The first memory space in which one of two instructions writes what the other touches."""
    for space in ("dram", "spad", "acc"):
        if wi[space] and (wi[space] & wj[space] or wi[space] & rj[space]):
            return space
        if wj[space] and wj[space] & ri[space]:
            return space
    return None


def find_races(program: Program, dram: np.ndarray | None = None) -> list[str]:
    """Pairs of instructions of different engines that touch the same memory (one writing)
    without being ordered; an empty list means the program is race free (in order of the
    later instruction, then the earlier).

    The order is derived from the machine, not from how the program was built: an engine
    starts and retires in program order; the k-th token an engine B takes from engine A
    (in B's program order) is the k-th token A gives B (in A's order), so the waiting
    instruction starts after the signalling one and every earlier A instruction retired;
    everything before a BARRIER retires before anything after it starts. ``dram`` is the
    image GATHER indices are read from (default: the program's initial DRAM).
    """
    cfg = program.config
    instrs = program.decoded()
    halts = [i for i, ins in enumerate(instrs) if ins.opcode == Opcode.HALT]
    if halts:
        instrs = instrs[:halts[0] + 1]      # nothing after the first HALT is dispatched
    n = len(instrs)
    if dram is None:
        dram = program.initial_dram()
    sets = [access_sets(ins, cfg, dram, program.dram_bytes) for ins in instrs]
    eng = [ins.engine for ins in instrs]
    # Program order of each engine's instructions, the signals it gives and waits it takes.
    by_engine: dict[int, list[int]] = {int(e): [] for e in Engine}
    signals: dict[tuple[int, int], list[int]] = {}
    waits: dict[tuple[int, int], list[int]] = {}
    barriers: list[int] = []
    for j, ins in enumerate(instrs):
        if ins.opcode == Opcode.BARRIER:
            barriers.append(j)
        if eng[j] is None:
            continue
        b = int(eng[j])
        by_engine[b].append(j)
        for a in Engine:
            if ins.signal >> a & 1:
                signals.setdefault((b, int(a)), []).append(j)
            if ins.wait >> a & 1:
                waits.setdefault((int(a), b), []).append(j)
    # done[j]: bitset of instructions certainly retired when j starts. Monotone fixpoint.
    paired: dict[int, list[int]] = {}
    for pair, ws in waits.items():
        ss = signals.get(pair, [])
        for k, j in enumerate(ws):
            if k < len(ss):
                paired.setdefault(j, []).append(ss[k])
    prefix: dict[int, int] = {}   # i -> bitset of its engine's instructions up to and incl. i
    prev_same: dict[int, int] = {}
    for idxs in by_engine.values():
        acc = 0
        for k, i in enumerate(idxs):
            acc |= 1 << i
            prefix[i] = acc
            if k:
                prev_same[i] = idxs[k - 1]
    before_barrier = [0] * n
    mask = 0
    bi = 0
    for j in range(n):
        while bi < len(barriers) and barriers[bi] < j:
            mask = (1 << barriers[bi]) - 1
            bi += 1
        before_barrier[j] = mask
    done = [0] * n
    changed = True
    while changed:
        changed = False
        for j in range(n):
            if eng[j] is None:
                continue
            d = done[j] | before_barrier[j]
            if j in prev_same:
                d |= done[prev_same[j]]
            for s in paired.get(j, ()):
                d |= prefix[s] | done[s]
            if d != done[j]:
                done[j] = d
                changed = True
    races = []
    for j in range(n):
        if eng[j] is None:
            continue
        rj, wj = sets[j]
        # Earlier instructions of other engines not known to retire before j starts.
        cand = ((1 << j) - 1) & ~done[j] & ~prefix[by_engine[int(eng[j])][-1]]
        while cand:
            low = cand & -cand
            cand ^= low
            i = low.bit_length() - 1
            if eng[i] is None or done[i] >> j & 1:
                continue
            space = _conflict(*sets[i], rj, wj)
            if space:
                races.append(f"instructions {i} ({instrs[i].opcode.name} on {eng[i].name}) and "
                             f"{j} ({instrs[j].opcode.name} on {eng[j].name}) both touch "
                             f"{space} and are not ordered by tokens or a barrier")
    return races


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------

def f32_scale_bits(rng: np.random.Generator, n: int, special: float = 0.08) -> np.ndarray:
    """``n`` int32 bit patterns for a VECTOR fp32 multiplier row: mostly normal float32 scales
    in [2**-20, 2**-2) (random mantissa, one in seven a power of two so products hit ties,
    one in ten negative); a ``special`` share are arbitrary patterns: exponent field 0 (zero,
    subnormal), 255 (inf, NaN) or any 32 bits."""
    exp = rng.integers(127 - 20, 127 - 2, n)
    mant = np.where(rng.random(n) < 1 / 7, 0, rng.integers(0, 1 << 23, n))
    sign = (rng.random(n) < 0.1).astype(np.int64)
    bits = (sign << 31) | (exp << 23) | mant
    odd = rng.random(n) < special
    kind = rng.integers(0, 3, n)
    any_sign = rng.integers(0, 2, n) << 31
    anything = np.where(kind == 0, any_sign | rng.integers(0, 1 << 23, n),            # exp 0
                        np.where(kind == 1, any_sign | (0xFF << 23) | np.where(
                            rng.random(n) < 0.5, 0, rng.integers(0, 1 << 23, n)),  # inf, NaN
                                 rng.integers(0, 1 << 32, n)))                      # any
    bits = np.where(odd, anything, bits)
    return bits.astype(np.uint32).view(np.int32)


def _kind(k: Opcode | str | int) -> Opcode:
    if isinstance(k, str):
        try:
            return Opcode[k.upper()]
        except KeyError:
            raise ValueError(f"unknown instruction kind {k!r}; kinds are "
                             f"{[x.name for x in KINDS]}") from None
    op = Opcode(k)
    if op not in KINDS:
        raise ValueError(f"{op.name} is not a kind the generator draws; kinds are "
                         f"{[x.name for x in KINDS]}")
    return op


class _Gen:
    """Builds one random program instruction by instruction, adding tokens as it goes."""

    def __init__(self, rng: np.random.Generator, cfg: NPUConfig, kinds: Sequence[Opcode],
                 boundary: float) -> None:
        self.rng, self.cfg, self.kinds, self.boundary = rng, cfg, tuple(kinds), boundary
        cols = cfg.cols
        acc_row = cfg.acc_row_bytes
        # DRAM: [0, data) random bytes starting with three realistic VECTOR parameter triples
        # (two integer, one of float32 scales), then the int8 input "x", then the GATHER index
        # lists (never written by STORE).
        self.data_bytes = acc_row * int(rng.integers(24, 64))
        self.x_rows = int(rng.integers(1, 9))
        self.x_addr = self.data_bytes
        self.writable = self.x_addr + self.x_rows * cols
        self.index_addr = self.writable
        self.index_bytes = 4 * (cfg.gather_max + 64) if Opcode.GATHER in kinds else 0
        self.dram_bytes = self.index_addr + self.index_bytes
        self.dram = np.zeros(self.dram_bytes, dtype=np.uint8)
        self.dram[:self.data_bytes] = rng.integers(0, 256, self.data_bytes, dtype=np.uint8)
        params = np.zeros((_PARAM_SETS * VECTOR_PARAM_ROWS, cols), dtype="<i4")
        for t in range(_PARAM_SETS):
            params[3 * t] = rng.integers(-2000, 2001, cols)                 # bias
            params[3 * t + 1] = rng.integers(1 << 29, (1 << 31) - 1, cols)  # multiplier
            params[3 * t + 2] = rng.integers(26, 46, cols)                  # shift
        # The last set is for fp32 VECTORs: float32 scales, and a shift row they ignore.
        params[3 * _F32_SET + 1] = f32_scale_bits(rng, cols)
        params[3 * _F32_SET + 2] = rng.integers(-(1 << 31), 1 << 31, cols)
        self.dram[:params.nbytes] = params.view(np.uint8).reshape(-1)
        self.index_top = self.index_addr
        # On-chip windows: most addresses fall in a small window so that instructions share
        # memory (and need tokens); `boundary` of them end at the last row instead.
        self.spad_window = min(cfg.spad_rows, 4 * cfg.rows + 32)
        self.acc_window = min(cfg.acc_rows, 48)
        self.param_acc = int(rng.integers(0, self.acc_window
                                          - _PARAM_SETS * VECTOR_PARAM_ROWS + 1))
        # The program so far.
        self.ops: list[Opcode] = []
        self.fields: list[dict[str, int]] = []
        self.wait: list[int] = []
        self.signal: list[int] = []
        self.engine: list[int | None] = []
        self.sets: list[tuple[Sets, Sets]] = []
        self.last_barrier = -1
        self.sync_engine: int | None = None
        self.raw_words: dict[int, np.ndarray] = {}   # index -> illegal word (fault programs)

    # Random helpers ------------------------------------------------------------------------
    def _count(self, hi: int) -> int:
        if self.rng.random() < 0.25:
            return 1
        return int(self.rng.integers(1, hi + 1))

    def _place(self, extent: int, size: int, window: int) -> int | None:
        """First address of a run of ``extent`` in [0, size): at the top with probability
        ``boundary``, else in the low window when it fits."""
        if extent > size or extent < 1:
            return None
        if self.rng.random() < self.boundary:
            return size - extent
        hi = (min(window, size) if extent <= window else size) - extent
        return int(self.rng.integers(0, hi + 1))

    def _int8(self) -> int:
        return int(self.rng.integers(-128, 128))

    def _row_bytes(self, mem: int) -> int:
        top = self.cfg.mem_row_bytes(mem)
        u = self.rng.random()
        if u < 0.35 or self.rng.random() < self.boundary:
            return top
        if u < 0.45:
            return 1
        return int(self.rng.integers(1, top + 1))

    def _clamps(self, zero_point: int) -> tuple[int, int]:
        u = self.rng.random()
        if u < 0.4:
            return -128, 127
        if u < 0.6:
            return zero_point, 127                             # ReLU
        if u < 0.7:
            return zero_point, min(127, zero_point + 60)       # ReLU6-like
        return self._int8(), self._int8()                      # anything, even min > max

    # Field generators (one per kind) -------------------------------------------------------
    def _gen_load(self) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        mem = int(Mem.ACC) if rng.random() < 0.25 else int(Mem.SPAD)
        rb = self._row_bytes(mem)
        rbmax = cfg.mem_row_bytes(mem)
        n_inner = self._count(8)
        n_outer = 1 if rng.random() < 0.5 else self._count(4)
        dso = n_inner if rng.random() < 0.5 else int(rng.integers(0, n_inner + 5))
        fill = int(rng.random() < 0.15)
        dsi = int(rng.choice([rb, rbmax, int(rng.integers(0, 2 * rbmax + 1))]))
        dram_so = n_inner * dsi if rng.random() < 0.5 else int(rng.integers(0, 8 * rbmax + 1))
        window = self.acc_window if mem else self.spad_window
        dst = self._place((n_outer - 1) * dso + n_inner, cfg.mem_rows(mem), window)
        extent = (n_outer - 1) * dram_so + (n_inner - 1) * dsi + rb
        dram_addr = (int(rng.integers(0, 1 << 16)) if fill
                     else self._place(extent, self.dram_bytes, self.dram_bytes))
        if dst is None or dram_addr is None:
            return None
        return dict(dram_addr=dram_addr, dram_stride_outer=dram_so, dram_stride_inner=dsi,
                    dst=dst, dst_stride_outer=dso, n_inner=n_inner, n_outer=n_outer,
                    row_bytes=rb, mem=mem, fill=fill, fill_value=self._int8())

    def _gen_gather(self, bad_index: bool = False) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        mem = int(Mem.ACC) if rng.random() < 0.25 else int(Mem.SPAD)
        rb = self._row_bytes(mem)
        room = (self.index_addr + self.index_bytes - self.index_top) // 4 - 1
        if room < 1:
            return None
        n = cfg.gather_max if rng.random() < self.boundary / 2 else self._count(8)
        n = min(n, room, cfg.gather_max)
        stride = int(rng.choice([rb, cfg.mem_row_bytes(mem),
                                 int(rng.integers(0, 3 * cfg.mem_row_bytes(mem) + 1))]))
        table = int(rng.integers(0, self.dram_bytes - rb + 1))
        top = (self.dram_bytes - rb - table) // stride if stride else 1 << 20
        idx = rng.integers(0, top + 1, n).astype(np.int64)
        if bad_index:
            k = int(rng.integers(0, n))
            if rng.random() < 0.5 or not stride:
                idx[k] = -int(rng.integers(1, 1 << 20))
            else:
                idx[k] = top + int(rng.integers(1, 100))
        index_addr = self.index_top + (int(rng.integers(1, 4)) if rng.random() < 0.2 else 0)
        dst = self._place(n, cfg.mem_rows(mem), self.acc_window if mem else self.spad_window)
        if dst is None:
            return None
        self.dram[index_addr:index_addr + 4 * n] = idx.astype("<i4").view(np.uint8)
        self.index_top = index_addr + 4 * n
        return dict(dram_addr=table, index_addr=index_addr, row_stride=stride, dst=dst, n=n,
                    row_bytes=rb, mem=mem)

    def _gen_preload(self) -> dict[str, int] | None:
        addr = self._place(self.cfg.rows, self.cfg.spad_rows, self.spad_window)
        return None if addr is None else dict(spad_addr=addr)

    def _gen_matmul(self) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        n_inner = self._count(8)
        n_outer = 1 if rng.random() < 0.6 else self._count(3)
        ssi = 1 if rng.random() < 0.5 else int(rng.integers(0, 4))
        sso = n_inner * ssi if rng.random() < 0.5 else int(rng.integers(0, n_inner * 2 + 5))
        spad = self._place((n_outer - 1) * sso + (n_inner - 1) * ssi + 1, cfg.spad_rows,
                           self.spad_window)
        acc = self._place(n_inner * n_outer, cfg.acc_rows, self.acc_window)
        if spad is None or acc is None:
            return None
        return dict(spad_addr=spad, spad_stride_outer=sso, spad_stride_inner=ssi, acc_addr=acc,
                    n_inner=n_inner, n_outer=n_outer, accumulate=int(rng.random() < 0.4),
                    swap=int(rng.random() < 0.5))

    def _gen_vector(self) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        n = self._count(8)
        acc = self._place(n, cfg.acc_rows, self.acc_window)
        spad = self._place(n, cfg.spad_rows, self.spad_window)
        fp32 = int(rng.random() < FP32_SHARE)
        u = rng.random()
        if u < 0.8:     # a loaded parameter set: fp32 VECTORs mostly take the float one
            if fp32 and u < 0.7:
                t = _F32_SET
            else:       # integer sets (as scales: arbitrary patterns, huge exponents)
                t = int(rng.integers(0, _PARAM_SETS if fp32 else _F32_SET))
            param = self.param_acc + VECTOR_PARAM_ROWS * t
        else:
            param = self._place(VECTOR_PARAM_ROWS, cfg.acc_rows, self.acc_window)
        if acc is None or spad is None or param is None:
            return None
        zp = 0 if rng.random() < 0.4 else self._int8()
        lo, hi = self._clamps(zp)
        return dict(acc_addr=acc, spad_addr=spad, param_addr=param, n=n, zero_point=zp,
                    clamp_min=lo, clamp_max=hi, fp32=fp32)

    def _gen_eltwise(self) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        n_inner = self._count(8)
        n_outer = 1 if rng.random() < 0.6 else self._count(3)
        f: dict[str, int] = dict(func=int(rng.integers(0, 2)), n_inner=n_inner, n_outer=n_outer)
        for src in ("a", "b"):
            si = 1 if rng.random() < 0.6 else int(rng.integers(0, 4))
            so = n_inner * si if rng.random() < 0.6 else int(rng.integers(0, 2 * n_inner + 5))
            addr = self._place((n_outer - 1) * so + (n_inner - 1) * si + 1, cfg.spad_rows,
                               self.spad_window)
            if addr is None:
                return None
            f.update({f"{src}_addr": addr, f"{src}_stride_inner": si,
                      f"{src}_stride_outer": so})
        mode = rng.random()
        if mode < 0.35:   # in place on one operand: dst coincides with it element for element
            src = "a" if rng.random() < 0.5 else "b"
            f[f"{src}_stride_inner"], f[f"{src}_stride_outer"] = 1, n_inner
            dst = self._place(n_inner * n_outer, cfg.spad_rows, self.spad_window)
            if dst is None:
                return None
            f[f"{src}_addr"] = dst
            if rng.random() < 0.3:    # both operands the same rows: x + x, max(x, x)
                other = "b" if src == "a" else "a"
                f[f"{other}_addr"], f[f"{other}_stride_inner"] = dst, 1
                f[f"{other}_stride_outer"] = n_inner
        else:
            dst = self._place(n_inner * n_outer, cfg.spad_rows, self.spad_window)
            if dst is None:
                return None
        zp = 0 if rng.random() < 0.3 else self._int8()
        lo, hi = self._clamps(zp)
        shift = self._elt_shift()
        f.update(dst=dst, shift=shift, a_mult=self._elt_mult(shift),
                 b_mult=self._elt_mult(shift), a_zero=self._int8(), b_zero=self._int8(),
                 zero_point=zp, clamp_min=lo, clamp_max=hi)
        return f

    def _elt_shift(self) -> int:
        """ELTWISE ``shift`` over its field range: the edges 0 and max, else uniform."""
        top = _ELT_FIELDS["shift"].hi
        u = self.rng.random()
        return 0 if u < 0.05 else top if u < 0.1 else int(self.rng.integers(0, top + 1))

    def _elt_mult(self, shift: int) -> int:
        """An ELTWISE multiplier over its field range: the edges 0 and max; typical ones as
        the compiler makes them (about ``2**(shift - 2)``, so the sum lands in the int8 range
        instead of saturating); or any bit length."""
        top = _ELT_FIELDS["a_mult"].hi
        u = self.rng.random()
        if u < 0.1:
            return 0
        if u < 0.2:
            return top
        if u < 0.7 and shift >= 2:
            lo = 1 << max(0, min(shift - 3, top.bit_length() - 1))
            return int(self.rng.integers(lo, min(1 << (shift - 1), top) + 1))
        return int(self.rng.integers(0, 1 << int(self.rng.integers(1, top.bit_length() + 1))))

    def _gen_store(self) -> dict[str, int] | None:
        rng, cfg = self.rng, self.cfg
        mem = int(Mem.ACC) if rng.random() < 0.25 else int(Mem.SPAD)
        rb = self._row_bytes(mem)
        rbmax = cfg.mem_row_bytes(mem)
        n_inner = self._count(8)
        n_outer = 1 if rng.random() < 0.5 else self._count(4)
        sso = n_inner if rng.random() < 0.5 else int(rng.integers(0, n_inner + 5))
        dsi = int(rng.choice([rb, rbmax, int(rng.integers(0, 2 * rbmax + 1))]))
        dso = n_inner * dsi if rng.random() < 0.5 else int(rng.integers(0, 8 * rbmax + 1))
        src = self._place((n_outer - 1) * sso + n_inner, cfg.mem_rows(mem),
                          self.acc_window if mem else self.spad_window)
        dram = self._place((n_outer - 1) * dso + (n_inner - 1) * dsi + rb, self.writable,
                           self.writable)
        if src is None or dram is None:
            return None
        return dict(dram_addr=dram, dram_stride_outer=dso, dram_stride_inner=dsi, src=src,
                    src_stride_outer=sso, n_inner=n_inner, n_outer=n_outer, row_bytes=rb,
                    mem=mem)

    def _gen_sync(self) -> dict[str, int] | None:
        return dict(engine=int(self.rng.integers(0, 4)))

    def fields_for(self, op: Opcode) -> dict[str, int] | None:
        """Legal random fields for ``op`` (None after repeated failure to fit)."""
        gen = {Opcode.LOAD: self._gen_load, Opcode.GATHER: self._gen_gather,
               Opcode.PRELOAD: self._gen_preload, Opcode.MATMUL: self._gen_matmul,
               Opcode.VECTOR: self._gen_vector, Opcode.ELTWISE: self._gen_eltwise,
               Opcode.STORE: self._gen_store, Opcode.SYNC: self._gen_sync,
               Opcode.BARRIER: dict}[op]
        for _ in range(30):
            f = gen()
            if f is not None and address_error(Instr(op, 0, 0, f), self.cfg,
                                               self.dram_bytes) is None:
                return f
        return None

    # Tokens --------------------------------------------------------------------------------
    def order(self, a: int, j: int) -> None:
        """Make instruction ``j`` start after the last instruction of engine ``a`` before it
        retires (the race-freedom rule of the module docstring)."""
        b = self.engine[j]
        assert b is not None and a != b
        prev = [i for i in range(j) if self.engine[i] == a]
        if not prev:
            return
        i = prev[-1]
        if self.signal[i] >> b & 1:
            return     # its signal pairs with an earlier wait of b: j already follows it
        self.signal[i] |= 1 << b
        self.wait[j] |= 1 << a

    def append(self, op: Opcode, f: dict[str, int], wait: int = 0, signal: int = 0) -> int:
        """Append one instruction exactly as given (no tokens added); returns its index."""
        j = len(self.ops)
        ins = Instr(op, 0, 0, f)
        self.ops.append(op)
        self.fields.append(dict(ins.fields))
        self.wait.append(wait)
        self.signal.append(signal)
        self.engine.append(None if ins.engine is None else int(ins.engine))
        self.sets.append(access_sets(ins, self.cfg, self.dram, self.dram_bytes))
        if op == Opcode.BARRIER:
            self.last_barrier = j
        return j

    def add(self, op: Opcode, f: dict[str, int], extra_tokens: float = 0.08) -> int:
        """Append one instruction with the tokens that order it after every earlier
        instruction it conflicts with (plus random extra ones); returns its index."""
        j = self.append(op, f)
        b = self.engine[j]
        if b is None:
            return j
        rj, wj = self.sets[j]
        need = set()
        for i in range(self.last_barrier + 1, j):
            a = self.engine[i]
            if a is not None and a != b and a not in need and _conflict(*self.sets[i], rj, wj):
                need.add(a)
        for a in range(4):
            if a == b:
                continue
            p = 0.5 if op == Opcode.SYNC else extra_tokens
            if self.sync_engine == a:
                p = 0.7
            if a in need or self.rng.random() < p:
                self.order(a, j)
        if self.sync_engine is not None and self.sync_engine != b:
            self.sync_engine = None
        if op == Opcode.SYNC:
            self.sync_engine = b
        return j

    def add_random(self, op: Opcode) -> int | None:
        f = self.fields_for(op)
        if f is None:
            f, op = dict(engine=int(self.rng.integers(0, 4))), Opcode.SYNC
        return self.add(op, f)

    def draw_kinds(self, n: int) -> list[Opcode]:
        """``n`` kinds, each of ``self.kinds`` at least once when ``n`` allows."""
        w = np.array([_WEIGHT[k] for k in self.kinds])
        seq = list(self.kinds) if n >= len(self.kinds) else []
        seq += [self.kinds[k] for k in self.rng.choice(len(self.kinds), n - len(seq),
                                                       p=w / w.sum())]
        self.rng.shuffle(seq)
        return seq

    def body(self, n: int) -> None:
        """Append ``n`` random instructions (a parameter LOAD first when VECTOR may use it)."""
        if n >= 2 and Opcode.VECTOR in self.kinds and Opcode.LOAD in self.kinds:
            rows = _PARAM_SETS * VECTOR_PARAM_ROWS
            acc_row = self.cfg.acc_row_bytes
            self.add(Opcode.LOAD, dict(dram_addr=0, dram_stride_outer=0,
                                       dram_stride_inner=acc_row, dst=self.param_acc,
                                       dst_stride_outer=0, n_inner=rows, n_outer=1,
                                       row_bytes=acc_row, mem=int(Mem.ACC)))
            n -= 1
        kinds = self.draw_kinds(n)
        while kinds:
            op = kinds.pop()
            burst = self.cfg.retire_depth + 1
            if op == Opcode.SYNC and len(kinds) >= burst and self.rng.random() < 0.15:
                # A DMA then more SYNCs on its engine than retire_depth: in-order retirement
                # holds them behind the DMA, so the engine stalls on RETIRE.
                dma = Opcode.LOAD if self.rng.random() < 0.5 else Opcode.STORE
                j = self.add_random(dma)
                for _ in range(burst):
                    self.add(Opcode.SYNC, {"engine": self.engine[j]}, extra_tokens=0.0)
                    kinds.pop()
            else:
                self.add_random(op)

    # Output --------------------------------------------------------------------------------
    def words(self) -> np.ndarray:
        out = np.zeros((len(self.ops), 4), dtype=np.uint64)
        for j, op in enumerate(self.ops):
            if j in self.raw_words:
                out[j] = self.raw_words[j]
            else:
                ins = Instr(op, self.wait[j], self.signal[j], self.fields[j])
                out[j] = np.frombuffer(encode(ins), dtype="<u8")
        return out

    def program(self, config: NPUConfig | None = None, **metadata: Any) -> Program:
        segments = [Segment("data", 0, self.dram[:self.data_bytes].tobytes())]
        if self.index_bytes:
            segments.append(Segment("indices", self.index_addr,
                                    self.dram[self.index_addr:self.dram_bytes].tobytes()))
        return Program(config or self.cfg, self.words(), self.dram_bytes, segments,
                       inputs=[Binding("x", self.x_addr, (self.x_rows, self.cfg.cols), "int8")],
                       outputs=[Binding("dram", 0, (self.writable,), "uint8")],
                       metadata={"generator": "npu.randprog", **metadata})


def _config_and_kinds(config: str | NPUConfig, kinds: Iterable[Opcode | str] | None
                      ) -> tuple[NPUConfig, tuple[Opcode, ...]]:
    cfg = get_config(config)
    ks = KINDS if kinds is None else tuple(dict.fromkeys(_kind(k) for k in kinds))
    if not ks:
        raise ValueError("kinds must name at least one instruction kind")
    return cfg, ks


def random_program(rng: np.random.Generator, config: str | NPUConfig = "npu4",
                   n_instructions: int = 40, kinds: Iterable[Opcode | str] | None = None, *,
                   boundary: float = 0.1) -> Program:
    """A random valid, race-free program of ``n_instructions`` instructions plus HALT.

    ``kinds`` restricts the instruction kinds drawn (default :data:`KINDS`); each kind appears
    at least once when ``n_instructions`` allows. ``boundary`` is the probability that an
    address lands at the top of its memory. DRAM holds random data segments, an int8 input
    ``x`` (see :func:`random_inputs`) and GATHER index lists; the output ``dram`` is the
    writable part of DRAM.
    """
    cfg, ks = _config_and_kinds(config, kinds)
    if not 0 <= n_instructions <= cfg.token_max:
        raise ValueError(f"n_instructions={n_instructions} must be in [0, token_max="
                         f"{cfg.token_max}] so that no token counter can overflow")
    gen = _Gen(rng, cfg, ks, boundary)
    gen.body(n_instructions)
    gen.add(Opcode.HALT, {})
    return gen.program(kinds=[k.name for k in ks])


def random_inputs(rng: np.random.Generator, program: Program) -> dict[str, np.ndarray]:
    """Uniformly random values over the full range of each input binding's dtype."""
    out = {}
    for b in program.inputs:
        dt = np.dtype(b.dtype)
        if dt.kind == "f":
            out[b.name] = rng.standard_normal(b.shape).astype(dt)
        else:
            info = np.iinfo(dt)
            out[b.name] = rng.integers(info.min, info.max, b.shape, dtype=dt, endpoint=True)
    return out


# --------------------------------------------------------------------------------------------
# Programs that fault
# --------------------------------------------------------------------------------------------

def _illegal_word(gen: _Gen) -> tuple[np.ndarray, str]:
    """A 256-bit word that fails to decode, and how."""
    rng = gen.rng
    variant = str(rng.choice(["opcode", "reserved", "own_engine", "barrier_tokens"]))
    if variant == "opcode":
        words = rng.integers(0, 1 << 63, 4, dtype=np.uint64) * np.uint64(2)
        opcode = int(rng.choice([0, 11, 12, 13, 14, 15]))
        words[0] = (words[0] & ~np.uint64(0xF)) | np.uint64(opcode)
        return words, variant
    if variant == "barrier_tokens":
        word = int(Opcode.BARRIER) | (int(rng.integers(1, 16)) << 4)
        return np.array([word, 0, 0, 0], dtype=np.uint64), variant
    op = Opcode(int(rng.choice([k for k in KINDS if k not in (Opcode.BARRIER,)])))
    f = gen.fields_for(op) or {}
    ins = Instr(op, 0, 0, f) if f else Instr(Opcode.SYNC, 0, 0, {"engine": 0})
    value = int.from_bytes(encode(ins), "little")
    if variant == "own_engine":
        value |= 1 << (LAYOUTS[ins.opcode]["wait"].lsb + int(ins.engine))
    else:
        used = 0
        for fld in LAYOUTS[ins.opcode].values():
            used |= ((1 << fld.width) - 1) << fld.lsb
        free = [b for b in range(256) if not used >> b & 1]
        value |= 1 << int(rng.choice(free))
    return np.frombuffer(value.to_bytes(32, "little"), dtype="<u8").astype(np.uint64), variant


def _bad_address_fields(gen: _Gen) -> tuple[Opcode, dict[str, int]]:
    """Fields that fit their bit widths but touch memory outside the machine (or are 0-sized,
    too wide, or overlap illegally)."""
    rng, cfg = gen.rng, gen.cfg
    for _ in range(200):
        op = Opcode(int(rng.choice([Opcode.LOAD, Opcode.GATHER, Opcode.PRELOAD, Opcode.MATMUL,
                                    Opcode.VECTOR, Opcode.ELTWISE, Opcode.STORE])))
        f = gen.fields_for(op)
        if f is None:
            continue
        how = rng.random()
        if op == Opcode.GATHER and how < 0.2:
            f["n"] = cfg.gather_max + 1
        elif how < 0.25:
            key = rng.choice([k for k in ("n", "n_inner", "n_outer", "row_bytes") if k in f]
                             or ["spad_addr"])
            f[str(key)] = 0
        elif how < 0.4 and "row_bytes" in f:
            f["row_bytes"] = cfg.mem_row_bytes(f["mem"]) + int(rng.integers(1, 8))
        elif how < 0.55 and "dram_addr" in f and not f.get("fill", 0):
            f["dram_addr"] = gen.dram_bytes - int(rng.integers(0, 3))
        elif op == Opcode.ELTWISE and how < 0.7:
            f["dst"] = f["a_addr"] + 1
            f["a_stride_inner"] = 1
            f["n_inner"] = max(2, f["n_inner"])
        else:
            addr = [k for k in f if k in ("dst", "src", "spad_addr", "acc_addr", "param_addr",
                                          "a_addr", "b_addr")]
            if not addr:
                continue
            key = str(rng.choice(addr))
            space = "acc" if key in ("acc_addr", "param_addr") or (
                key in ("dst", "src") and f.get("mem") == 1 and op != Opcode.ELTWISE) else "spad"
            top = cfg.acc_rows if space == "acc" else cfg.spad_rows
            f[key] = top - int(rng.integers(0, 2))
        try:
            ins = Instr(op, 0, 0, f)
        except ValueError:
            continue
        if address_error(ins, cfg, gen.dram_bytes) is not None:
            return op, f
    raise AssertionError("could not draw an out-of-range instruction")


def fault_program(rng: np.random.Generator, config: str | NPUConfig, kind: Fault | str | int,
                  n_instructions: int | None = None) -> Program:
    """A program that faults with ``kind`` (see :data:`FAULT_KINDS`), built around a random
    valid prefix (``n_instructions`` long, default random in [0, 20]).

    * ILLEGAL_INSTRUCTION: an illegal opcode, reserved bits, a token mask naming the
      instruction's own engine, a BARRIER with tokens, or no HALT at the end.
    * ADDRESS_OUT_OF_RANGE: a static out-of-range (or zero-sized, too wide, illegally
      overlapping) access, or a GATHER whose index selects a row outside DRAM.
    * TOKEN_DEADLOCK: a wait that no signal pairs with, or two SYNCs waiting for each other.
    * WATCHDOG: a valid program whose config's ``watchdog_cycles`` is below a lower bound of
      its cycle count (the config is a copy of ``config`` with that limit).
    * TOKEN_OVERFLOW: ``token_max + 1`` unmatched signals from one engine to another.

    The program is not validated (it may be illegal); ``metadata["fault"]`` names the kind and
    ``metadata["variant"]`` how it was provoked.
    """
    cfg = get_config(config)
    code = Fault[kind.upper()] if isinstance(kind, str) else Fault(kind)
    if code not in FAULT_KINDS:
        raise ValueError(f"cannot build a program faulting with {code.name}; kinds are "
                         f"{[k.name for k in FAULT_KINDS]}")
    n = int(rng.integers(0, 21)) if n_instructions is None else n_instructions
    gen = _Gen(rng, cfg, KINDS, 0.1)
    gen.body(n)
    variant = ""
    run_config = None
    if code == Fault.ILLEGAL_INSTRUCTION:
        if rng.random() < 0.15:
            variant = "no_halt"
        else:
            word, variant = _illegal_word(gen)
            gen.raw_words[gen.append(Opcode.SYNC, {"engine": 0})] = word
    elif code == Fault.ADDRESS_OUT_OF_RANGE:
        if rng.random() < 0.4 and gen.index_bytes:
            variant = "gather_index"
            for _ in range(100):
                f = gen._gen_gather(bad_index=True)
                if f is not None and address_error(Instr(Opcode.GATHER, 0, 0, f), cfg,
                                                   gen.dram_bytes) is None:
                    break
            else:
                raise AssertionError("could not draw a GATHER with a bad index")
            gen.add(Opcode.GATHER, f)
        else:
            variant = "static"
            op, f = _bad_address_fields(gen)
            j = gen.append(Opcode.SYNC, {"engine": 0})
            gen.raw_words[j] = np.frombuffer(encode(Instr(op, 0, 0, f)), dtype="<u8")
    elif code == Fault.TOKEN_DEADLOCK:
        a, b = (int(x) for x in rng.choice(4, 2, replace=False))
        if rng.random() < 0.5:
            variant = "unpaired_wait"
            op = Opcode(int(rng.choice(list(KINDS[:7]))))
            f = gen.fields_for(op)
            if f is None:
                op, f = Opcode.SYNC, {"engine": b}
            j = gen.add(op, f)
            free = [e for e in range(4) if e != gen.engine[j] and not gen.wait[j] >> e & 1]
            if not free:    # already waits on every other engine: a fresh SYNC instead
                j = gen.append(Opcode.SYNC, {"engine": b})
                free = [e for e in range(4) if e != b]
            gen.wait[j] |= 1 << int(rng.choice(free))
        else:
            variant = "sync_cycle"
            gen.append(Opcode.SYNC, {"engine": a}, wait=1 << b, signal=1 << b)
            gen.append(Opcode.SYNC, {"engine": b}, wait=1 << a, signal=1 << a)
    elif code == Fault.WATCHDOG:
        variant = "limit"
        if not gen.ops:
            gen.add_random(Opcode.LOAD)
        gen.add(Opcode.HALT, {})
        bound = len(gen.ops)   # HALT at index len-1 is dispatched at cycle >= len-1
        for i, op in enumerate(gen.ops):
            if gen.engine[i] is not None:
                bound = max(bound, i + 1 + timing(Instr(op, 0, 0, gen.fields[i]), cfg).latency)
        run_config = dataclasses.replace(cfg, watchdog_cycles=int(rng.integers(1, bound)))
    elif code == Fault.TOKEN_OVERFLOW:
        variant = "unmatched_signals"
        a, b = (int(x) for x in rng.choice(4, 2, replace=False))
        for _ in range(cfg.token_max + 1):
            gen.append(Opcode.SYNC, {"engine": a}, signal=1 << b)
    if code != Fault.WATCHDOG and variant != "no_halt":
        gen.add(Opcode.HALT, {})
    return gen.program(run_config, fault=code.name, variant=variant)


# --------------------------------------------------------------------------------------------
# hypothesis
# --------------------------------------------------------------------------------------------

def program_strategy(config: str | NPUConfig = "npu4", min_instructions: int = 0,
                     max_instructions: int = 40, kinds: Iterable[Opcode | str] | None = None):
    """A hypothesis strategy of ``(program, inputs)`` pairs from :func:`random_program`.

    The program is drawn from a seed, so hypothesis shrinks the seed and the length only.
    """
    from hypothesis import strategies as st  # a test dependency: imported on use

    cfg, ks = _config_and_kinds(config, kinds)

    def make(seed: int, n: int) -> tuple[Program, dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        prog = random_program(rng, cfg, n, ks)
        return prog, random_inputs(rng, prog)

    return st.builds(make, st.integers(0, 2**63 - 1),
                     st.integers(min_instructions, max_instructions))
