"""Benchmark: the same program on the RTL (Verilator) and on the runtime (numba).

Builds ``examples/gemm.py``'s tiled, double-buffered GEMM (256^3 on npu16 by default), runs it
on the numba engine (after a warm-up run, so JIT compilation is not timed) and on the RTL
simulation top under Verilator through ``npu.verify`` (the build is cached under build/rtl/
and not timed), checks that the two agree bit for bit and cycle for cycle, and prints:

* the simulated cycle count;
* the runtime's wall time and simulated cycles per second;
* the RTL's wall time for the run itself (start to done, the whole program inside the
  simulator) and its cycles per second, and separately the time to load the program and DRAM
  image and read the memories back;
* the ratio of the two run times.

The last line is ``rtl_vs_runtime cycles=<n> runtime_cps=<x> rtl_cps=<y> ratio=<r>``.

Usage: ``python bench/rtl_vs_runtime.py [--config npu16] [--size 256] [--sim verilator]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import time

from npu.conformance import _gemm_module
from npu.runtime import run
from npu.verify import Case, verify_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="npu16")
    parser.add_argument("--size", type=int, default=256, help="M = K = N (default 256)")
    parser.add_argument("--sim", default="verilator")
    parser.add_argument("--json", help="also write the figures as JSON")
    args = parser.parse_args()
    gemm = _gemm_module()
    n = args.size
    prog, inputs, expected = gemm.build_gemm(args.config, n, n, n, 0)
    print(f"gemm {n}x{n}x{n} on {args.config}: {prog.n_instructions} instructions, "
          f"{prog.dram_bytes} bytes of DRAM")
    run(prog, inputs)                                  # warm-up: numba compilation
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        res = run(prog, inputs)
        best = min(best, time.perf_counter() - t)
    assert (res.outputs()["C"] == expected).all(), "runtime result differs from numpy"
    cycles = res.cycles
    t = time.perf_counter()
    verdict = verify_cases([Case(f"gemm{n}", prog, inputs)], sim=args.sim,
                           progress=lambda m: print("  " + m))[0]
    wall = time.perf_counter() - t
    print(verdict.report())
    if not verdict.ok:
        raise SystemExit(1)
    rtl_cps = cycles / verdict.rtl_run_s
    rt_cps = cycles / best
    figures = {
        "config": args.config, "size": n, "cycles": cycles,
        "runtime_s": best, "runtime_cycles_per_s": rt_cps,
        "rtl_run_s": verdict.rtl_run_s, "rtl_cycles_per_s": rtl_cps,
        "rtl_load_and_readback_s": verdict.rtl_total_s - verdict.rtl_run_s,
        "rtl_wall_s_with_build_check": wall, "ratio_rtl_over_runtime": verdict.rtl_run_s / best,
    }
    print(f"cycles                    {cycles:,}")
    print(f"runtime (numba)           {best:9.3f} s   {rt_cps:14,.0f} cycles/s")
    print(f"RTL ({args.sim}) run      {verdict.rtl_run_s:9.3f} s   {rtl_cps:14,.0f} cycles/s")
    print(f"RTL load + read-back      {figures['rtl_load_and_readback_s']:9.3f} s")
    print(f"ratio RTL / runtime       {figures['ratio_rtl_over_runtime']:9.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=1)
    print(f"rtl_vs_runtime cycles={cycles} runtime_cps={rt_cps:.0f} rtl_cps={rtl_cps:.0f} "
          f"ratio={figures['ratio_rtl_over_runtime']:.1f}")


if __name__ == "__main__":
    main()
