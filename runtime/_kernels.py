"""All jitted code of the numba engine: the datapath kernels and the scheduler.

Datapath: each ``exec_*`` kernel applies one instruction's memory effects exactly as
``npu/numerics.py`` and ``docs/architecture.md`` define them; ``tests/runtime/test_engine.py``
compares each with its numpy twin (the reference interpreter's function). A kernel takes the
instruction's column of the field matrix (``int64[n_fields]``, in :data:`npu.isa.ALL_FIELD_NAMES`
order, decoded by :func:`npu.isa.field_matrix`) and the memories. No kernel checks static
addresses: the scheduler only starts an instruction that passed :func:`npu.isa.address_error`
(at load, or through its static fault flag). What no static check can see (GATHER indices) is
checked before anything is written.

Scheduler: :func:`simulate` runs the timing contract over typed arrays (see its docstring).

Everything jitted lives in this one module on purpose: numba's disk cache of a function is
invalidated only by edits of the file defining it, not of the functions it calls, so a kernel in
another file could be silently replaced by its stale cached copy. The facts of ``npu.isa`` and
``npu.runtime.result`` compiled in as constants are guarded by :data:`ISA_FINGERPRINT`.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
from numba import njit

from npu.isa import ALL_FIELD_NAMES, EltFunc, Engine, Fault, Mem, Opcode, Unit
from npu.numerics import F32_PRODUCT_LIMIT
from npu.runtime.result import Stall


def isa_fingerprint() -> str:
    """A digest of the ISA facts this module compiles in as constants (field order, opcodes,
    units, engines, faults, memories, ELTWISE functions, stall codes, the fp32 product limit)."""
    facts = [ALL_FIELD_NAMES] + [[(m.name, int(m)) for m in enum]
                                 for enum in (Opcode, Unit, Engine, Fault, Mem, EltFunc, Stall)]
    facts.append([("F32_PRODUCT_LIMIT", F32_PRODUCT_LIMIT)])
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


#: :func:`isa_fingerprint` when this file was last checked against the ISA. If the ISA changes,
#: cached kernels would keep the old constants (numba only watches this file): then the
#: fingerprints differ, the kernels are compiled without the disk cache (correct, slower to
#: start) and a warning asks to review the kernels and update this value.
ISA_FINGERPRINT = "cb8cf819a4702ead"
_CACHE_OK = isa_fingerprint() == ISA_FINGERPRINT
if not _CACHE_OK:
    warnings.warn(f"npu.isa changed since runtime/_kernels.py was last checked against it: the "
                  f"numba kernels are compiled without the disk cache. Review them and set "
                  f"ISA_FINGERPRINT = {isa_fingerprint()!r}.", stacklevel=1)

#: The one set of njit options of the runtime: cached on disk, no fast-math (bit exactness first),
#: numpy error model (no division checks: the kernels divide by nothing).
NJIT = {"cache": _CACHE_OK, "fastmath": False, "nogil": True, "error_model": "numpy"}

#: Column of each field in the field matrix (module-level ints are compile-time constants in
#: numba, so each F_* below costs nothing in the kernels).
FIELD_COLUMN = {name: k for k, name in enumerate(ALL_FIELD_NAMES)}
_COL = FIELD_COLUMN
N_FIELDS = len(ALL_FIELD_NAMES)
F_OPCODE = _COL["opcode"]
F_WAIT = _COL["wait"]
F_SIGNAL = _COL["signal"]
F_ENGINE = _COL["engine"]
F_DRAM_ADDR = _COL["dram_addr"]
F_DRAM_STRIDE_OUTER = _COL["dram_stride_outer"]
F_DRAM_STRIDE_INNER = _COL["dram_stride_inner"]
F_DST = _COL["dst"]
F_DST_STRIDE_OUTER = _COL["dst_stride_outer"]
F_SRC = _COL["src"]
F_SRC_STRIDE_OUTER = _COL["src_stride_outer"]
F_N_INNER = _COL["n_inner"]
F_N_OUTER = _COL["n_outer"]
F_N = _COL["n"]
F_ROW_BYTES = _COL["row_bytes"]
F_MEM = _COL["mem"]
F_FILL = _COL["fill"]
F_FILL_VALUE = _COL["fill_value"]
F_INDEX_ADDR = _COL["index_addr"]
F_ROW_STRIDE = _COL["row_stride"]
F_SPAD_ADDR = _COL["spad_addr"]
F_SPAD_STRIDE_OUTER = _COL["spad_stride_outer"]
F_SPAD_STRIDE_INNER = _COL["spad_stride_inner"]
F_ACC_ADDR = _COL["acc_addr"]
F_ACCUMULATE = _COL["accumulate"]
F_SWAP = _COL["swap"]
F_PARAM_ADDR = _COL["param_addr"]
F_ZERO_POINT = _COL["zero_point"]
F_CLAMP_MIN = _COL["clamp_min"]
F_CLAMP_MAX = _COL["clamp_max"]
F_FP32 = _COL["fp32"]
F_FUNC = _COL["func"]
F_A_ADDR = _COL["a_addr"]
F_B_ADDR = _COL["b_addr"]
F_SHIFT = _COL["shift"]
F_A_STRIDE_OUTER = _COL["a_stride_outer"]
F_B_STRIDE_OUTER = _COL["b_stride_outer"]
F_A_STRIDE_INNER = _COL["a_stride_inner"]
F_B_STRIDE_INNER = _COL["b_stride_inner"]
F_A_MULT = _COL["a_mult"]
F_B_MULT = _COL["b_mult"]
F_A_ZERO = _COL["a_zero"]
F_B_ZERO = _COL["b_zero"]

MEM_SPAD = int(Mem.SPAD)
ELT_ADD = int(EltFunc.ADD)

#: Largest array height for which the float32 MATMUL datapath is exact: every partial sum of
#: ``rows`` int8 x int8 products is an integer of magnitude <= rows * 2**14 <= 2**24.
FLOAT32_EXACT_ROWS = 1 << 10


@njit(**NJIT)
def wrap32(x: int) -> int:
    """Two's-complement wrap of an int64 to the int32 range (twin: numerics.wrap_int32)."""
    return ((x + 0x80000000) & 0xFFFFFFFF) - 0x80000000


@njit(**NJIT)
def round_shift(x: int, shift: int) -> int:
    """round(x / 2**shift), ties to even, shift taken mod 64 (twin: numerics.round_shift)."""
    s = shift & 63
    if s == 0:
        return x
    q = x >> s
    r = x - (q << s)
    half = np.int64(1) << (s - 1)
    if r > half or (r == half and (q & 1) == 1):
        return q + 1
    return q


@njit(**NJIT)
def clamp8(y: int, lo: int, hi: int) -> int:
    """min(max(y, lo), hi) saturated to int8 (twin: numerics.clamp)."""
    y = min(max(y, lo), hi)
    return min(max(y, -128), 127)


@njit(**NJIT)
def _local_bytes(mem: int, spad: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """The byte view (rows x row bytes) of the memory a ``mem`` field selects; ACC rows are
    little-endian int32 lanes, as on the (little-endian) host."""
    if mem == MEM_SPAD:
        return spad.view(np.uint8)
    return acc.view(np.uint8)


@njit(**NJIT)
def _put_row(dst: np.ndarray, src: np.ndarray, rb: int) -> None:
    """``dst[:rb] = src[:rb]``, the rest of ``dst`` 0 (loops over slices from index 0, which
    LLVM vectorises)."""
    for b in range(rb):
        dst[b] = src[b]
    for b in range(rb, dst.shape[0]):
        dst[b] = 0


@njit(**NJIT)
def exec_load(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """LOAD: 2-D strided DRAM -> SPAD/ACC rows (or fill); the rest of each row becomes 0.
    Later rows win where runs overlap (o, i order)."""
    n_inner, rb = f[F_N_INNER], f[F_ROW_BYTES]
    local = _local_bytes(f[F_MEM], spad, acc)
    for o in range(f[F_N_OUTER]):
        for i in range(n_inner):
            row = local[f[F_DST] + o * f[F_DST_STRIDE_OUTER] + i]
            if f[F_FILL] != 0:
                fill = np.uint8(f[F_FILL_VALUE] & 0xFF)
                for b in range(rb):
                    row[b] = fill
                for b in range(rb, row.shape[0]):
                    row[b] = 0
            else:
                src = f[F_DRAM_ADDR] + o * f[F_DRAM_STRIDE_OUTER] + i * f[F_DRAM_STRIDE_INNER]
                _put_row(row, dram[src:src + rb], rb)


@njit(**NJIT)
def _gather_index(f: np.ndarray, dram: np.ndarray, i: int) -> int:
    """GATHER's ``i``-th index: int32 little endian at ``index_addr + 4 i``."""
    a = f[F_INDEX_ADDR] + 4 * i
    return wrap32(np.int64(dram[a]) | (np.int64(dram[a + 1]) << 8)
                  | (np.int64(dram[a + 2]) << 16) | (np.int64(dram[a + 3]) << 24))


@njit(**NJIT)
def gather_ok(f: np.ndarray, dram: np.ndarray) -> bool:
    """Whether every GATHER index names a table row inside DRAM (checked before any write)."""
    for i in range(f[F_N]):
        idx = _gather_index(f, dram, i)
        first = f[F_DRAM_ADDR] + idx * f[F_ROW_STRIDE]
        if idx < 0 or first < 0 or first + f[F_ROW_BYTES] > dram.shape[0]:
            return False
    return True


@njit(**NJIT)
def exec_gather(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """GATHER: row ``dst + i`` <- DRAM row ``int32le(index[i])`` of the table (rest 0).
    The caller has checked the indices with :func:`gather_ok`."""
    rb = f[F_ROW_BYTES]
    local = _local_bytes(f[F_MEM], spad, acc)
    for i in range(f[F_N]):
        src = f[F_DRAM_ADDR] + _gather_index(f, dram, i) * f[F_ROW_STRIDE]
        _put_row(local[f[F_DST] + i], dram[src:src + rb], rb)


@njit(**NJIT)
def exec_store(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """STORE: the first ``row_bytes`` bytes of each SPAD/ACC row -> 2-D strided DRAM.
    Later rows win where DRAM runs overlap (o, i order)."""
    rb = f[F_ROW_BYTES]
    local = _local_bytes(f[F_MEM], spad, acc)
    for o in range(f[F_N_OUTER]):
        for i in range(f[F_N_INNER]):
            row = local[f[F_SRC] + o * f[F_SRC_STRIDE_OUTER] + i]
            first = f[F_DRAM_ADDR] + o * f[F_DRAM_STRIDE_OUTER] + i * f[F_DRAM_STRIDE_INNER]
            dst = dram[first:first + rb]
            for b in range(rb):
                dst[b] = row[b]


@njit(**NJIT)
def exec_preload(f: np.ndarray, spad: np.ndarray, wbank: np.ndarray, wbank_f: np.ndarray,
                 bank: int) -> None:
    """PRELOAD: ``rows`` SPAD rows -> weight bank ``bank`` (int8, and its float32 copy)."""
    rows, cols = wbank.shape[1], wbank.shape[2]
    first = f[F_SPAD_ADDR] * cols
    src = spad.reshape(-1)[first:first + rows * cols]
    w = wbank[bank].reshape(-1)
    wf = wbank_f[bank].reshape(-1)
    for t in range(rows * cols):
        w[t] = src[t]
        wf[t] = src[t]


@njit(**NJIT)
def exec_matmul(f: np.ndarray, spad: np.ndarray, acc: np.ndarray, wbank: np.ndarray,
                wbank_f: np.ndarray, bank: int, xbuf: np.ndarray, ybuf: np.ndarray) -> None:
    """MATMUL with weight bank ``bank`` (the swap is the caller's): ACC rows = or += x @ W.

    The int8 inputs are gathered into float32 and multiplied by BLAS: every partial sum is an
    integer of magnitude <= rows * 2**14 <= 2**24 when rows <= FLOAT32_EXACT_ROWS, so the
    product is exact; the accumulation into ACC is int32 with wrap-around like the hardware.
    ``xbuf``/``ybuf`` are float32 scratch of at least acc_rows rows. The copies run over flat
    slices indexed from 0, so that LLVM vectorises them (a computed index could be negative,
    and numba's wrap-around of negative indices would keep the loops scalar)."""
    n_inner, n_outer = f[F_N_INNER], f[F_N_OUTER]
    n = n_inner * n_outer
    rows, cols = wbank.shape[1], wbank.shape[2]
    a0 = f[F_ACC_ADDR]
    accumulate = f[F_ACCUMULATE] != 0
    if rows <= FLOAT32_EXACT_ROWS:
        x_flat = xbuf.reshape(-1)
        if f[F_SPAD_STRIDE_INNER] == 1 and (n_outer == 1 or f[F_SPAD_STRIDE_OUTER] == n_inner):
            first = f[F_SPAD_ADDR] * rows  # the input rows are one contiguous block
            src = spad.reshape(-1)[first:first + n * rows]
            for t in range(n * rows):
                x_flat[t] = src[t]
        else:
            k = 0
            for o in range(n_outer):
                first = f[F_SPAD_ADDR] + o * f[F_SPAD_STRIDE_OUTER]
                for i in range(n_inner):
                    row = first + i * f[F_SPAD_STRIDE_INNER]
                    for j in range(rows):
                        xbuf[k, j] = spad[row, j]
                    k += 1
        np.dot(xbuf[:n], wbank_f[bank], ybuf[:n])
        y_flat = ybuf.reshape(-1)
        dst = acc.reshape(-1)[a0 * cols:(a0 + n) * cols]
        if accumulate:
            for t in range(n * cols):  # int32 + int32 stored into int32: wraps
                dst[t] = dst[t] + np.int32(y_flat[t])
        else:
            for t in range(n * cols):
                dst[t] = np.int32(y_flat[t])
    else:  # taller arrays: exact int64 dot products, wrapped
        k = 0
        for o in range(n_outer):
            first = f[F_SPAD_ADDR] + o * f[F_SPAD_STRIDE_OUTER]
            for i in range(n_inner):
                row = first + i * f[F_SPAD_STRIDE_INNER]
                for j in range(cols):
                    s = np.int64(0)
                    for r in range(rows):
                        s += np.int64(spad[row, r]) * np.int64(wbank[bank, r, j])
                    if accumulate:
                        s += np.int64(acc[a0 + k, j])
                    acc[a0 + k, j] = wrap32(s)
                k += 1


@njit(**NJIT)
def exec_vector(f: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """VECTOR: requantize ACC rows into SPAD with per-lane bias, multiplier, shift rows, or with
    float32 scales in the multiplier row when ``fp32`` is set (twin: numerics.requantize)."""
    if f[F_FP32] != 0:
        _vector_fp32(f, spad, acc)
        return
    p = f[F_PARAM_ADDR]
    zp, lo, hi = f[F_ZERO_POINT], f[F_CLAMP_MIN], f[F_CLAMP_MAX]
    for i in range(f[F_N]):
        src, dst = f[F_ACC_ADDR] + i, f[F_SPAD_ADDR] + i
        for j in range(acc.shape[1]):
            x = wrap32(np.int64(acc[src, j]) + np.int64(acc[p, j]))
            prod = x * np.int64(acc[p + 1, j])
            spad[dst, j] = clamp8(round_shift(prod, np.int64(acc[p + 2, j])) + zp, lo, hi)


@njit(**NJIT)
def _vector_fp32(f: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """VECTOR with ``fp32=1``: ``clamp(rint(f32(f32(x) * scale)) + zp)`` in float32 only (a
    float64 anywhere would round once instead of twice). Exponent 0/255 patterns are scale 0
    (numerics.f32_scales); products beyond F32_PRODUCT_LIMIT saturate (also +-inf)."""
    p = f[F_PARAM_ADDR]
    zp, lo, hi = f[F_ZERO_POINT], f[F_CLAMP_MIN], f[F_CLAMP_MAX]
    scales = acc[p + 1].view(np.float32)          # the bit patterns, reinterpreted
    limit = np.float32(F32_PRODUCT_LIMIT)
    zero = np.float32(0)
    for i in range(f[F_N]):
        src, dst = f[F_ACC_ADDR] + i, f[F_SPAD_ADDR] + i
        for j in range(acc.shape[1]):
            x = wrap32(np.int64(acc[src, j]) + np.int64(acc[p, j]))
            exp = (np.int64(acc[p + 1, j]) >> 23) & 0xFF
            scale = zero if exp == 0 or exp == 0xFF else scales[j]
            prod = np.float32(x) * scale           # int64 -> float32 and the product: RNE
            if prod > limit:
                prod = limit
            elif prod < -limit:
                prod = -limit
            spad[dst, j] = clamp8(np.int64(np.rint(prod)) + zp, lo, hi)


@njit(**NJIT)
def exec_eltwise(f: np.ndarray, spad: np.ndarray) -> None:
    """ELTWISE ADD (rescaled) or MAX of SPAD rows. Row by row, each row read before written,
    which is exact because the destination either coincides with an operand element for
    element or does not overlap it (``isa.address_error`` enforces it)."""
    n_inner = f[F_N_INNER]
    add = f[F_FUNC] == ELT_ADD
    za, zb, ma, mb = f[F_A_ZERO], f[F_B_ZERO], f[F_A_MULT], f[F_B_MULT]
    shift, zp, lo, hi = f[F_SHIFT], f[F_ZERO_POINT], f[F_CLAMP_MIN], f[F_CLAMP_MAX]
    for o in range(f[F_N_OUTER]):
        for i in range(n_inner):
            ra = f[F_A_ADDR] + o * f[F_A_STRIDE_OUTER] + i * f[F_A_STRIDE_INNER]
            rb = f[F_B_ADDR] + o * f[F_B_STRIDE_OUTER] + i * f[F_B_STRIDE_INNER]
            rd = f[F_DST] + o * n_inner + i
            for j in range(spad.shape[1]):
                a, b = np.int64(spad[ra, j]), np.int64(spad[rb, j])
                if add:
                    y = round_shift((a - za) * ma + (b - zb) * mb, shift) + zp
                else:
                    y = max(a, b)
                spad[rd, j] = clamp8(y, lo, hi)


# --------------------------------------------------------------------------------------------
# The scheduler: the timing contract, cycle by cycle (event driven)
# --------------------------------------------------------------------------------------------

# Opcodes, units, faults and stall codes as plain ints (compile-time constants in the kernel).
OP_LOAD, OP_GATHER, OP_PRELOAD = int(Opcode.LOAD), int(Opcode.GATHER), int(Opcode.PRELOAD)
OP_MATMUL, OP_VECTOR, OP_ELTWISE = int(Opcode.MATMUL), int(Opcode.VECTOR), int(Opcode.ELTWISE)
OP_STORE, OP_SYNC = int(Opcode.STORE), int(Opcode.SYNC)
OP_BARRIER, OP_HALT = int(Opcode.BARRIER), int(Opcode.HALT)
UNIT_NONE = int(Unit.NONE)
ENGINE_VX = int(Engine.VX)
N_UNITS = len(Unit)
N_ENGINES = len(Engine)
FAULT_ILLEGAL = int(Fault.ILLEGAL_INSTRUCTION)
FAULT_ADDRESS = int(Fault.ADDRESS_OUT_OF_RANGE)
FAULT_DEADLOCK = int(Fault.TOKEN_DEADLOCK)
FAULT_WATCHDOG = int(Fault.WATCHDOG)
FAULT_OVERFLOW = int(Fault.TOKEN_OVERFLOW)
ST_UNIT, ST_TOKEN, ST_BANK = int(Stall.UNIT), int(Stall.TOKEN), int(Stall.BANK)
ST_PRELOAD, ST_RETIRE, ST_HAZARD = int(Stall.PRELOAD), int(Stall.RETIRE), int(Stall.HAZARD)

# Rows of the trace matrix.
T_DISPATCH, T_READY, T_START, T_COMPLETE, T_RETIRE, T_STALL, T_ENGINE = range(7)
# Scalar machine state (int64 vector), kept between resumptions of the kernel.
(S_T, S_PC, S_HALTED, S_HALT_D, S_ACTIVE, S_PRELOAD_C, S_VX_C, S_N_DISP, S_N_RET,
 S_FAULT_CODE, S_FAULT_CYCLE, S_FAULT_INDEX, S_CYCLES) = range(13)
N_SCALARS = 13
# Per-engine state columns: queue ring head/length, in-flight ring head/length, last start and
# last retirement cycles.
E_QHEAD, E_QLEN, E_IHEAD, E_ILEN, E_LAST_START, E_LAST_RETIRE = range(6)
# Config vector.
C_QUEUE_DEPTH, C_RETIRE_DEPTH, C_TOKEN_MAX, C_LIMIT = range(4)
# Kernel return codes.
DONE, PAUSED, FAULTED = 0, 1, 2


@njit(**NJIT)
def simulate(F, unit, busy, lat, eng, sfault, cfgv, dram, spad, acc, wbank, wbank_f, xbuf,
             ybuf, trace, st, es, queue, infl, tok, tok_rise, unit_free, bank_free,
             stop_retired):
    """Run the machine from its state until it ends (DONE), faults (FAULTED; code, cycle, index
    in ``st``) or has retired ``stop_retired`` instructions (PAUSED, at the start of a cycle:
    calling again resumes exactly there).

    Program (read only): ``F`` field matrix [n_fields, N]; ``unit``/``busy``/``lat``/``eng``/
    ``sfault`` per instruction; ``cfgv`` config vector (C_*). Memories (updated): ``dram``,
    ``spad``, ``acc``, weight banks ``wbank`` (+ float32 copy ``wbank_f``); ``xbuf``/``ybuf``
    MATMUL scratch. Machine state (updated): ``trace`` [7, N] (T_* rows), scalars ``st`` (S_*),
    per-engine ``es`` (E_*) with the ``queue`` and in-flight (``infl``) rings, token counters
    ``tok[src, dst]`` and the cycle each last rose from 0 (``tok_rise``, for stall reasons),
    ``unit_free`` per unit and ``bank_free`` per weight bank."""
    n = F.shape[1]
    f = np.zeros(F.shape[0], dtype=np.int64)  # the started instruction's fields
    qd, rd = cfgv[C_QUEUE_DEPTH], cfgv[C_RETIRE_DEPTH]
    token_max, limit = cfgv[C_TOKEN_MAX], cfgv[C_LIMIT]
    t, pc, halted, halt_d = st[S_T], st[S_PC], st[S_HALTED], st[S_HALT_D]
    active, preload_c, vx_c = st[S_ACTIVE], st[S_PRELOAD_C], st[S_VX_C]
    n_disp, n_ret = st[S_N_DISP], st[S_N_RET]
    fault, f_cycle, f_index = 0, 0, 0
    status = DONE
    while True:
        if n_ret >= stop_retired:
            status = PAUSED
            break
        did = False
        # Phase 1: retire the oldest in-flight instruction of each engine if it is complete.
        for e in range(N_ENGINES):
            if es[e, E_ILEN] == 0:
                continue
            i = infl[e, es[e, E_IHEAD]]
            if trace[T_COMPLETE, i] > t:
                continue
            trace[T_RETIRE, i] = t
            es[e, E_LAST_RETIRE] = t
            es[e, E_IHEAD] = (es[e, E_IHEAD] + 1) % rd
            es[e, E_ILEN] -= 1
            n_ret += 1
            did = True
            sig = F[F_SIGNAL, i]
            for d in range(N_ENGINES):
                if (sig >> d) & 1:
                    if tok[e, d] + 1 > token_max:
                        fault, f_cycle, f_index = FAULT_OVERFLOW, t, i
                        break
                    if tok[e, d] == 0:
                        tok_rise[e, d] = t
                    tok[e, d] += 1
            if fault:
                break
        if fault:
            break
        # The program ends at the first cycle at which HALT was dispatched and nothing is
        # pending: t = max(r, halt dispatch + 1).
        if halted and n_ret == n_disp:
            st[S_CYCLES] = t
            break
        if t >= limit:
            fault, f_cycle = FAULT_WATCHDOG, limit
            break
        # Phase 2: start the head of each engine's queue if every condition holds.
        for e in range(N_ENGINES):
            if es[e, E_QLEN] == 0:
                continue
            i = queue[e, es[e, E_QHEAD]]
            if trace[T_DISPATCH, i] > t - 1:
                continue
            u = unit[i]
            if u != UNIT_NONE and t < unit_free[u]:
                continue
            wait = F[F_WAIT, i]
            ok = True
            for s in range(N_ENGINES):
                if (wait >> s) & 1 and tok[s, e] < 1:
                    ok = False
            if not ok or es[e, E_ILEN] >= rd:
                continue
            op = F[F_OPCODE, i]
            if op == OP_PRELOAD and t < bank_free[1 - active]:
                continue
            if op == OP_MATMUL and F[F_SWAP, i] != 0 and t < preload_c:
                continue
            if op == OP_ELTWISE and t < vx_c:
                continue
            # It starts. Its stall reason is the lowest-coded condition that still failed at
            # t - 1, i.e. among those satisfied last (each is monotone while it waits).
            ready = max(trace[T_DISPATCH, i] + 1, es[e, E_LAST_START] + 1)
            stall = 0
            if t > ready:
                tok_late = False
                for s in range(N_ENGINES):
                    if (wait >> s) & 1 and tok_rise[s, e] == t:
                        tok_late = True
                if u != UNIT_NONE and unit_free[u] == t:
                    stall = ST_UNIT
                elif tok_late:
                    stall = ST_TOKEN
                elif op == OP_PRELOAD and bank_free[1 - active] == t:
                    stall = ST_BANK
                elif op == OP_MATMUL and F[F_SWAP, i] != 0 and preload_c == t:
                    stall = ST_PRELOAD
                elif es[e, E_LAST_RETIRE] == t and es[e, E_ILEN] + 1 >= rd:
                    stall = ST_RETIRE
                elif op == OP_ELTWISE and vx_c == t:
                    stall = ST_HAZARD
            for s in range(N_ENGINES):
                if (wait >> s) & 1:
                    tok[s, e] -= 1
            c = t + lat[i]
            trace[T_READY, i] = ready
            trace[T_START, i] = t
            trace[T_COMPLETE, i] = c
            trace[T_STALL, i] = stall
            if u != UNIT_NONE:
                unit_free[u] = t + busy[i]
            if e == ENGINE_VX and c > vx_c:
                vx_c = c   # the latest completion on VX (a SYNC can complete before a VECTOR)
            es[e, E_QHEAD] = (es[e, E_QHEAD] + 1) % qd
            es[e, E_QLEN] -= 1
            infl[e, (es[e, E_IHEAD] + es[e, E_ILEN]) % rd] = i
            es[e, E_ILEN] += 1
            es[e, E_LAST_START] = t
            did = True
            # Memory effects, atomically at the start (engines in the order LD, EX, VX, ST).
            for k in range(F.shape[0]):
                f[k] = F[k, i]
            if op == OP_MATMUL:
                if f[F_SWAP] != 0:
                    active = 1 - active
                bank_free[active] = max(bank_free[active], c)
                exec_matmul(f, spad, acc, wbank, wbank_f, active, xbuf, ybuf)
            elif op == OP_PRELOAD:
                preload_c = c
                exec_preload(f, spad, wbank, wbank_f, 1 - active)
            elif op == OP_LOAD:
                exec_load(f, dram, spad, acc)
            elif op == OP_STORE:
                exec_store(f, dram, spad, acc)
            elif op == OP_VECTOR:
                exec_vector(f, spad, acc)
            elif op == OP_ELTWISE:
                exec_eltwise(f, spad)
            elif op == OP_GATHER:
                if not gather_ok(f, dram):
                    fault, f_cycle, f_index = FAULT_ADDRESS, t, i
                    break
                exec_gather(f, dram, spad, acc)
        if fault:
            break
        # Phase 3: dispatch at most one instruction.
        if not halted:
            if pc >= n:
                fault, f_cycle, f_index = FAULT_ILLEGAL, t, pc
                break
            if sfault[pc] != 0:
                fault, f_cycle, f_index = sfault[pc], t, pc
                break
            op = F[F_OPCODE, pc]
            if op == OP_HALT or op == OP_BARRIER:
                if op == OP_HALT or n_ret == n_disp:  # BARRIER waits for all earlier ones
                    # Recorded as one cycle at the dispatcher: s = d, c = r = d + 1.
                    trace[T_DISPATCH, pc] = t
                    trace[T_READY, pc] = t
                    trace[T_START, pc] = t
                    trace[T_COMPLETE, pc] = t + 1
                    trace[T_RETIRE, pc] = t + 1
                    if op == OP_HALT:
                        halted, halt_d = 1, t
                    pc += 1
                    did = True
            else:
                e = eng[pc]
                if es[e, E_QLEN] < qd:
                    queue[e, (es[e, E_QHEAD] + es[e, E_QLEN]) % qd] = pc
                    es[e, E_QLEN] += 1
                    trace[T_DISPATCH, pc] = t
                    trace[T_ENGINE, pc] = e
                    n_disp += 1
                    pc += 1
                    did = True
        if did:
            t += 1
            continue
        in_flight = 0
        for e in range(N_ENGINES):
            in_flight += es[e, E_ILEN]
        if in_flight == 0:  # nothing happened and nothing ever will
            fault, f_cycle, f_index = FAULT_DEADLOCK, t, pc
            for e in range(N_ENGINES):
                if es[e, E_QLEN] > 0:
                    f_index = min(f_index, queue[e, es[e, E_QHEAD]])
            break
        # Idle cycle: jump to the first later cycle at which a time threshold is reached (a
        # completion, a unit, a weight bank, a preload, the vector pipeline, the watchdog);
        # the cycles in between would all be copies of this one.
        nxt = limit if limit > t else t + 1
        for e in range(N_ENGINES):
            if es[e, E_ILEN] > 0:
                c = trace[T_COMPLETE, infl[e, es[e, E_IHEAD]]]
                if c > t:
                    nxt = min(nxt, c)
            if es[e, E_QLEN] > 0:
                i = queue[e, es[e, E_QHEAD]]
                u = unit[i]
                if u != UNIT_NONE and unit_free[u] > t:
                    nxt = min(nxt, unit_free[u])
                op = F[F_OPCODE, i]
                if op == OP_PRELOAD and bank_free[1 - active] > t:
                    nxt = min(nxt, bank_free[1 - active])
                if op == OP_MATMUL and preload_c > t:
                    nxt = min(nxt, preload_c)
                if op == OP_ELTWISE and vx_c > t:
                    nxt = min(nxt, vx_c)
        t = nxt
    if fault == FAULT_WATCHDOG:  # names the lowest-numbered instruction still pending
        f_index = pc
        for e in range(N_ENGINES):
            if es[e, E_QLEN] > 0:
                f_index = min(f_index, queue[e, es[e, E_QHEAD]])
            if es[e, E_ILEN] > 0:
                f_index = min(f_index, infl[e, es[e, E_IHEAD]])
    if fault:
        status = FAULTED
    st[S_T], st[S_PC], st[S_HALTED], st[S_HALT_D] = t, pc, halted, halt_d
    st[S_ACTIVE], st[S_PRELOAD_C], st[S_VX_C] = active, preload_c, vx_c
    st[S_N_DISP], st[S_N_RET] = n_disp, n_ret
    st[S_FAULT_CODE], st[S_FAULT_CYCLE], st[S_FAULT_INDEX] = fault, f_cycle, f_index
    return status
