"""Benchmark: how fast the numba engine simulates the tiled GEMM example on npu16.

For each size M = K = N in (256, 512, 1024) it builds ``examples/gemm.py``'s double-buffered
GEMM (not timed), runs it once to warm up, then times ``npu.runtime.run`` (validation, decoding
and the cycle-exact simulation; best of ``--repeat``) with the BLAS it calls limited to one
thread, and checks the result against numpy. In the same run it times numpy's float32 matmul of
the same shape, best of 10 with numpy's default BLAS threads (``np_all_s``) and best of 10 on
one thread (``np_one_s``), and prints the ratio of the simulation's wall time to the faster of
the two (on a shared machine the multi-threaded time is the noisier one).

The last line is ``runtime_speed MACs_per_s=<value> ratio_vs_numpy=<value>`` for the largest
size. Targets (issue 3): >= 1e9 simulated MAC/s and a ratio <= 20 for 1024^3.

Usage: ``python bench/runtime_speed.py [--sizes 256 512 1024] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time
from pathlib import Path

import numpy as np

from npu.runtime import run
from npu.runtime.engine import execute, prepare
from npu.runtime.io import initial_state

ROOT = Path(__file__).resolve().parent.parent


def _load_gemm_example():
    """examples/ is not a package: load examples/gemm.py by path."""
    spec = importlib.util.spec_from_file_location("gemm_example", ROOT / "examples" / "gemm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_blas_thread():
    """Limit BLAS (used by the MATMUL datapath) to one thread, if threadpoolctl is there."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _best(repeat: int, fn, *args):
    """Best wall time of ``repeat`` calls of ``fn(*args)``, and the last call's value."""
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, value


def _kernel(prep, program, inputs) -> None:
    execute(prep, *initial_state(program, inputs))


def measure(gemm, config: str, n: int, repeat: int) -> dict[str, float]:
    """Time one size; raises SystemExit if the simulated GEMM differs from numpy."""
    program, inputs, expected = gemm.build_gemm(config, n, n, n, seed=n)
    with _one_blas_thread():
        run(program, inputs)  # warm: first touch of this program's arrays
        wall, result = _best(repeat, run, program, inputs)
        # The same work split into setup (validate, decode, timing) and the kernel.
        setup, prep = _best(repeat, prepare, program)
        kernel, _ = _best(repeat, _kernel, prep, program, inputs)
    if not np.array_equal(result.outputs()["C"], expected):
        raise SystemExit(f"{n}^3: the simulated GEMM differs from numpy")
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    np.matmul(a, b)
    numpy_all, _ = _best(10, np.matmul, a, b)
    with _one_blas_thread():
        numpy_one, _ = _best(10, np.matmul, a, b)
    numpy_s = min(numpy_all, numpy_one)  # the faster of numpy's threads and one thread
    macs = n ** 3
    return {"n": n, "instrs": program.n_instructions, "cycles": result.cycles,
            "util": macs / (result.cycles * program.config.pes), "wall": wall, "setup": setup,
            "kernel": kernel, "macs_per_s": macs / wall, "numpy": numpy_s,
            "numpy_all": numpy_all, "numpy_one": numpy_one,
            "ratio": wall / numpy_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024],
                        help="GEMM sizes M = K = N (default 256 512 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per size (best)")
    parser.add_argument("--config", default="npu16", help="NPU preset (default npu16)")
    args = parser.parse_args()
    gemm = _load_gemm_example()
    warm, warm_inputs, _ = gemm.build_gemm(args.config, 32, 32, 32)
    run(warm, warm_inputs)  # loads (or compiles) the jitted kernels

    print(f"{'size':>6} {'instrs':>7} {'cycles':>10} {'util':>6} {'wall_s':>8} {'setup_s':>8} "
          f"{'kernel_s':>8} {'MAC/s':>9} {'np_all_s':>8} {'np_one_s':>8} {'ratio':>6}")
    r: dict[str, float] = {"macs_per_s": float("nan"), "ratio": float("nan")}
    for n in args.sizes:
        r = measure(gemm, args.config, n, args.repeat)
        print(f"{n:>6} {r['instrs']:>7} {r['cycles']:>10} {r['util']:>6.1%} {r['wall']:>8.3f} "
              f"{r['setup']:>8.3f} {r['kernel']:>8.3f} {r['macs_per_s']:>9.3g} "
              f"{r['numpy_all']:>8.4f} {r['numpy_one']:>8.4f} {r['ratio']:>6.1f}", flush=True)
    print(f"runtime_speed MACs_per_s={r['macs_per_s']:.4g} ratio_vs_numpy={r['ratio']:.3g}")


if __name__ == "__main__":
    main()
