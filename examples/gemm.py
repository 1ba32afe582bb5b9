"""A tiled, double-buffered int8 GEMM built with ProgramBuilder: C = requant(A @ B).

``A`` (int8 [M, K]) is the input, ``B`` (int8 [K, N]) a weight segment, ``C`` (int8 [M, N]) the
output, requantized per output column with a bias, a fixed-point multiplier and shift, and a
zero point, as a quantized linear layer would be.

Schedule (weight stationary; ``R`` = array rows = columns)::

    for each block of up to Mb rows of A (A's block is resident in SPAD, K/R column slices):
        for each output column tile nt (R columns):
            for each k tile kt:          LD: LOAD W(kt, nt) into weight buffer j % NW
                                         EX: PRELOAD it; MATMUL the block's slice kt with swap,
                                             accumulating into ACC buffer u % 2
            VX: VECTOR ACC buffer -> SPAD out buffer u % 2   (per-column requantization)
            ST: STORE it to C

Every buffer is a ring, and tokens pass both ways between the engines sharing it:

* weight buffers (NW): LOAD W(j) signals EX, PRELOAD j waits LD; PRELOAD j signals LD, and
  LOAD W(j + NW) waits for that credit;
* A blocks (2): a slice is loaded before the weight tile first used with it, so the weight
  tile's token covers it; the last MATMUL of block mb signals LD, and the first slice of block
  mb + 2 waits for it (placed so the EX->LD tokens pair up in order with the weight credits);
* ACC buffers (2): the last MATMUL of output tile u signals VX, VECTOR u waits EX; VECTOR u
  signals EX and the first MATMUL of tile u + 2 waits for it;
* out buffers (2): VECTOR u signals ST, STORE u waits VX; STORE u signals VX and VECTOR u + 2
  waits for it; the parameter LOAD signals VX once, for VECTOR 0.

The program order interleaves the engines (LD runs NW - 1 tiles ahead of EX), so every wait
follows its signal in program order, and the in-order dispatcher keeps all queues fed.

Run ``python examples/gemm.py --config npu16 --size 256`` for cycles and array utilization.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from npu import numerics
from npu.builder import ProgramBuilder
from npu.isa import Mem, NPUConfig, get_config
from npu.program import Program

__all__ = ["build_gemm", "ideal_cycles"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ideal_cycles(config: str | NPUConfig, M: int, K: int, N: int) -> float:
    """Cycles of a perfectly busy array: M*K*N MACs over rows*cols PEs."""
    cfg = get_config(config)
    return M * K * N / cfg.pes


def _requant_params(rng: np.random.Generator, K: int, N: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column bias, multiplier and shift mapping the int32 accumulator onto most of the int8
    range (about 3 standard deviations of a random product), with some per-column spread."""
    sigma = np.sqrt(K) * 74.0 * 74.0       # std of a sum of K products of uniform int8
    bias = rng.integers(-int(sigma), int(sigma) + 1, N).astype(np.int64)
    mult = np.zeros(N, dtype=np.int64)
    shift = np.zeros(N, dtype=np.int64)
    for n in range(N):
        scale = 127.0 / (3.0 * sigma) * float(rng.uniform(0.75, 1.33))
        mult[n], shift[n] = numerics.quantize_multiplier(scale)
    return bias, mult, shift


def build_gemm(config: str | NPUConfig = "npu16", M: int = 64, K: int = 64, N: int = 64,
               seed: int = 0, *, relu: bool = False, zero_point: int = -3,
               weight_buffers: int = 4, block_rows: int | None = None
               ) -> tuple[Program, dict[str, np.ndarray], np.ndarray]:
    """Build the tiled GEMM for ``config``; returns ``(program, inputs, expected C)``.

    Any positive M, K, N work (partial tiles are zero padded by LOAD's row fill). ``block_rows``
    caps the rows of A kept in SPAD per block (default: as many as SPAD and ACC allow);
    ``weight_buffers`` is the depth of the weight-tile ring.
    """
    cfg = get_config(config)
    for name, v in (("M", M), ("K", K), ("N", N), ("weight_buffers", weight_buffers)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    R = cfg.rows
    KT, NT = _cdiv(K, R), _cdiv(N, R)
    tiles_per_block = KT * NT
    NW = min(weight_buffers, tiles_per_block)
    lookahead = NW - 1            # LD runs this many weight tiles ahead in program order

    # Block rows: two A blocks (Mb * KT rows each), NW weight tiles and two out buffers in SPAD;
    # two ACC buffers of Mb rows beside 3 parameter rows per column tile.
    mb_spad = (cfg.spad_rows - NW * R) // (2 * KT + 2)
    mb_acc = (cfg.acc_rows - 3 * NT) // 2
    mb_max = min(mb_spad, mb_acc, 65535, block_rows or M)
    if mb_max < 1:
        raise ValueError(f"a {M}x{K}x{N} GEMM does not fit {cfg.name}: K={K} needs "
                         f"{2 * KT + 2} SPAD rows per A row and N={N} needs {3 * NT} ACC rows "
                         f"of parameters")
    MB = _cdiv(M, mb_max)
    Mb = _cdiv(M, MB)

    rng = np.random.default_rng(seed)
    A = rng.integers(-128, 128, (M, K), dtype=np.int8)
    B = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, mult, shift = _requant_params(rng, K, N)
    clamp_min = zero_point if relu else -128
    # float64 BLAS is exact here (every partial sum is an integer below K * 2**14 < 2**53) and
    # far faster than numpy's int64 matmul at the benchmark's sizes.
    acc = numerics.wrap_int32(np.rint(A.astype(np.float64) @ B.astype(np.float64)))
    expected = numerics.requantize(acc, bias, mult, shift, zero_point, clamp_min, 127)

    params = np.zeros((NT, 3, R), dtype="<i4")
    for nt in range(NT):
        cols = slice(nt * R, min(N, nt * R + R))
        width = cols.stop - cols.start
        params[nt, 0, :width] = bias[cols]
        params[nt, 1, :width] = mult[cols]
        params[nt, 2, :width] = shift[cols]

    b = ProgramBuilder(cfg)
    a_in = b.input("A", (M, K), "int8")
    c_out = b.output("C", (M, N), "int8")
    b_addr = b.segment("B", B)
    p_addr = b.segment("requant", params.reshape(NT * 3, R))
    p_acc = b.alloc_acc(3 * NT)
    acc_buf = [b.alloc_acc(Mb), b.alloc_acc(Mb)]
    a_buf = [b.alloc_spad(Mb * KT)] + ([b.alloc_spad(Mb * KT)] if MB > 1 else [])
    w_buf = [b.alloc_spad(R) for _ in range(NW)]
    out_buf = [b.alloc_spad(Mb), b.alloc_spad(Mb)]

    T = MB * tiles_per_block                       # weight tiles, j = (mb*NT + nt)*KT + kt
    U = MB * NT                                    # output tiles, u = mb*NT + nt

    def split(j: int) -> tuple[int, int, int]:
        mb, rest = divmod(j, tiles_per_block)
        nt, kt = divmod(rest, KT)
        return mb, nt, kt

    def rows_of(mb: int) -> tuple[int, int]:
        m0 = mb * Mb
        return m0, min(Mb, M - m0)

    # Where each A slice is loaded: block 0's slice kt right before W(kt); block mb >= 1's
    # slices spread after W(q0), q0 = last(mb - 2) + NW (the first with an A credit to take),
    # slice s no later than right before W(first(mb) + s).
    a_after: dict[int, list[tuple[int, int]]] = {}
    for mb in range(1, MB):
        first = mb * tiles_per_block
        q0 = (mb - 1) * tiles_per_block - 1 + NW
        for s in range(KT):
            a_after.setdefault(q0 + s * (first - q0) // KT, []).append((mb, s))

    def load_a_slice(mb: int, s: int) -> None:
        m0, mr = rows_of(mb)
        b.load(dram_addr=a_in.addr + m0 * K + s * R, dram_stride_inner=K,
               dst=a_buf[mb % 2] + s * Mb, n_inner=mr, row_bytes=min(R, K - s * R),
               wait="EX" if (mb >= 2 and s == 0) else None)

    def emit_ld(j: int) -> None:
        mb, nt, kt = split(j)
        if mb == 0 and nt == 0:
            load_a_slice(0, kt)
        b.load(dram_addr=b_addr + kt * R * N + nt * R, dram_stride_inner=N,
               dst=w_buf[j % NW], n_inner=min(R, K - kt * R), row_bytes=min(R, N - nt * R),
               wait="EX" if j >= NW else None, signal="EX")
        for mb2, s in a_after.get(j, []):
            load_a_slice(mb2, s)

    def emit_ex_vx_st(j: int) -> None:
        mb, nt, kt = split(j)
        u = mb * NT + nt
        m0, mr = rows_of(mb)
        last_of_block = (nt == NT - 1 and kt == KT - 1)
        b.preload(w_buf[j % NW], wait="LD", signal="LD" if j + NW < T else None)
        signal = []
        if kt == KT - 1:
            signal.append("VX")
        if last_of_block and mb + 2 < MB:
            signal.append("LD")
        b.matmul(spad_addr=a_buf[mb % 2] + kt * Mb, n_inner=mr, acc_addr=acc_buf[u % 2],
                 accumulate=int(kt > 0), swap=1,
                 wait="VX" if (kt == 0 and u >= 2) else None, signal=signal or None)
        if kt == KT - 1:
            wait = ["EX"] + (["LD"] if u == 0 else []) + (["ST"] if u >= 2 else [])
            b.vector(acc_addr=acc_buf[u % 2], spad_addr=out_buf[u % 2], param_addr=p_acc + 3 * nt,
                     n=mr, zero_point=zero_point, clamp_min=clamp_min, clamp_max=127,
                     wait=wait, signal=["ST"] + (["EX"] if u + 2 < U else []))
            b.store(dram_addr=c_out.addr + m0 * N + nt * R, dram_stride_inner=N,
                    src=out_buf[u % 2], n_inner=mr, row_bytes=min(R, N - nt * R),
                    mem=int(Mem.SPAD), wait="VX", signal="VX" if u + 2 < U else None)

    b.region("parameters")
    b.load(dram_addr=p_addr, dram_stride_inner=4 * R, dst=p_acc, n_inner=3 * NT,
           row_bytes=4 * R, mem=int(Mem.ACC), signal="VX")
    for step in range(T + lookahead):
        j = step - lookahead
        if step == 0 or (j > 0 and j % KT == 0):      # label by the output tile EX works on
            mb, nt, _ = split(max(j, 0))
            m0, mr = rows_of(mb)
            b.region(f"C[{m0}:{m0 + mr}, {nt * R}:{min(N, nt * R + R)}]")
        if step < T:
            emit_ld(step)
        if j >= 0:
            emit_ex_vx_st(j)
    program = b.build(metadata={"example": "gemm", "M": M, "K": K, "N": N, "seed": seed,
                                "block_rows": Mb, "weight_buffers": NW})
    return program, {"A": A}, expected


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiled int8 GEMM example, run it "
                                     "and print cycles and array utilization.")
    parser.add_argument("--config", default="npu16", help="preset name (default npu16)")
    parser.add_argument("--size", type=int, default=256, help="M = K = N (default 256)")
    parser.add_argument("-M", type=int, help="rows of A and C (overrides --size)")
    parser.add_argument("-K", type=int, help="reduction length (overrides --size)")
    parser.add_argument("-N", type=int, help="columns of B and C (overrides --size)")
    parser.add_argument("--engine", choices=("numba", "reference"), default="reference",
                        help="executor (default: the reference interpreter)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    M, K, N = (args.M or args.size), (args.K or args.size), (args.N or args.size)
    program, inputs, expected = build_gemm(args.config, M, K, N, args.seed)
    from npu.runtime import run  # examples may use the runtime; the builder does not

    t0 = time.perf_counter()
    result = run(program, inputs, engine=args.engine)
    wall = time.perf_counter() - t0
    ok = np.array_equal(result.outputs()["C"], expected)
    ideal = ideal_cycles(program.config, M, K, N)
    print(f"gemm {M}x{K}x{N} on {program.config.name}: {program.n_instructions} instructions, "
          f"block rows {program.metadata['block_rows']}, "
          f"{program.metadata['weight_buffers']} weight buffers")
    print(f"cycles {result.cycles}  ideal {ideal:.0f}  utilization {ideal / result.cycles:.1%}  "
          f"result {'matches numpy' if ok else 'DIFFERS from numpy'}  "
          f"({args.engine}, {wall:.2f} s wall)")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
