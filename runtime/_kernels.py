"""Jitted datapath kernels of the numba engine: the memory effects of each instruction.

Each kernel applies one instruction to the machine state, exactly as ``npu/numerics.py`` and
``docs/architecture.md`` define it; ``tests/runtime/test_engine.py`` compares every kernel with a
numpy twin built from ``npu.numerics``. A kernel takes the instruction's row of the field matrix
(``int64[n_fields]``, one column per name of :data:`npu.isa.ALL_FIELD_NAMES`, decoded by
:func:`npu.isa.field_arrays`) and the memories. Nothing here checks static addresses: the engine
only calls a kernel for an instruction that passed :func:`npu.isa.address_error` (at load, or by
the per-instruction static fault flag). What cannot be checked statically (GATHER indices) is
checked here before anything is written.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from npu.isa import ALL_FIELD_NAMES, EltFunc, Mem

#: The one set of njit options of the runtime: cached on disk, no fast-math (bit exactness first).
NJIT = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}

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
def exec_load(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """LOAD: 2-D strided DRAM -> SPAD/ACC rows (or fill); the rest of each row becomes 0."""
    n_inner, n_outer, rb = f[F_N_INNER], f[F_N_OUTER], f[F_ROW_BYTES]
    fill, fill_byte = f[F_FILL] != 0, f[F_FILL_VALUE] & 0xFF
    for o in range(n_outer):
        for i in range(n_inner):
            row = f[F_DST] + o * f[F_DST_STRIDE_OUTER] + i
            src = f[F_DRAM_ADDR] + o * f[F_DRAM_STRIDE_OUTER] + i * f[F_DRAM_STRIDE_INNER]
            if f[F_MEM] == MEM_SPAD:
                for b in range(spad.shape[1]):
                    v = 0
                    if b < rb:
                        v = fill_byte if fill else np.int64(dram[src + b])
                    spad[row, b] = v  # int8 store wraps 128..255 to negative
            else:
                for lane in range(acc.shape[1]):
                    v = 0
                    for k in range(4):
                        b = 4 * lane + k
                        if b < rb:
                            byte = fill_byte if fill else np.int64(dram[src + b])
                            v |= byte << (8 * k)
                    acc[row, lane] = wrap32(v)


@njit(**NJIT)
def gather_ok(f: np.ndarray, dram: np.ndarray) -> bool:
    """Whether every GATHER index names a table row inside DRAM (checked before any write)."""
    n_dram = dram.shape[0]
    for i in range(f[F_N]):
        a = f[F_INDEX_ADDR] + 4 * i
        idx = wrap32(np.int64(dram[a]) | (np.int64(dram[a + 1]) << 8)
                     | (np.int64(dram[a + 2]) << 16) | (np.int64(dram[a + 3]) << 24))
        first = f[F_DRAM_ADDR] + idx * f[F_ROW_STRIDE]
        if idx < 0 or first < 0 or first + f[F_ROW_BYTES] > n_dram:
            return False
    return True


@njit(**NJIT)
def exec_gather(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """GATHER: row ``dst + i`` <- DRAM row ``int32le(index[i])`` of the table (rest 0).
    The caller has checked the indices with :func:`gather_ok`."""
    rb = f[F_ROW_BYTES]
    for i in range(f[F_N]):
        a = f[F_INDEX_ADDR] + 4 * i
        idx = wrap32(np.int64(dram[a]) | (np.int64(dram[a + 1]) << 8)
                     | (np.int64(dram[a + 2]) << 16) | (np.int64(dram[a + 3]) << 24))
        src = f[F_DRAM_ADDR] + idx * f[F_ROW_STRIDE]
        row = f[F_DST] + i
        if f[F_MEM] == MEM_SPAD:
            for b in range(spad.shape[1]):
                spad[row, b] = np.int64(dram[src + b]) if b < rb else 0
        else:
            for lane in range(acc.shape[1]):
                v = 0
                for k in range(4):
                    b = 4 * lane + k
                    if b < rb:
                        v |= np.int64(dram[src + b]) << (8 * k)
                acc[row, lane] = wrap32(v)


@njit(**NJIT)
def exec_store(f: np.ndarray, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray) -> None:
    """STORE: the first ``row_bytes`` bytes of each SPAD/ACC row -> 2-D strided DRAM."""
    rb = f[F_ROW_BYTES]
    for o in range(f[F_N_OUTER]):
        for i in range(f[F_N_INNER]):
            row = f[F_SRC] + o * f[F_SRC_STRIDE_OUTER] + i
            dst = f[F_DRAM_ADDR] + o * f[F_DRAM_STRIDE_OUTER] + i * f[F_DRAM_STRIDE_INNER]
            if f[F_MEM] == MEM_SPAD:
                for b in range(rb):
                    dram[dst + b] = np.int64(spad[row, b]) & 0xFF
            else:
                for b in range(rb):
                    dram[dst + b] = (np.int64(acc[row, b >> 2]) >> (8 * (b & 3))) & 0xFF


@njit(**NJIT)
def exec_preload(f: np.ndarray, spad: np.ndarray, wbank: np.ndarray, wbank_f: np.ndarray,
                 bank: int) -> None:
    """PRELOAD: ``rows`` SPAD rows -> weight bank ``bank`` (int8, and its float32 copy)."""
    base = f[F_SPAD_ADDR]
    for k in range(wbank.shape[1]):
        for j in range(wbank.shape[2]):
            w = spad[base + k, j]
            wbank[bank, k, j] = w
            wbank_f[bank, k, j] = np.float32(w)


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
    """VECTOR: requantize ACC rows into SPAD with per-lane bias, multiplier, shift rows."""
    p = f[F_PARAM_ADDR]
    zp, lo, hi = f[F_ZERO_POINT], f[F_CLAMP_MIN], f[F_CLAMP_MAX]
    for i in range(f[F_N]):
        src, dst = f[F_ACC_ADDR] + i, f[F_SPAD_ADDR] + i
        for j in range(acc.shape[1]):
            x = wrap32(np.int64(acc[src, j]) + np.int64(acc[p, j]))
            prod = x * np.int64(acc[p + 1, j])
            spad[dst, j] = clamp8(round_shift(prod, np.int64(acc[p + 2, j])) + zp, lo, hi)


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
