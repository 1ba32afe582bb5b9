"""NeRF MLPs on the NPU with and without the MLP lowerings of ``npu.compiler.passes.mlp``.

``python bench/nerf_lowering.py [--config npu16]`` compiles, for each model, the same QDQ
model twice (the ``split_k`` and ``siblings`` passes on, then off) and runs one batch on the
numba engine; it prints cycles, the array-busy utilization of ``npu profile`` / ``npu demo``
(MATMUL rows x PEs over cycles x PEs), the useful-MAC utilization (the model's MACs over
cycles x PEs), DRAM traffic and instruction counts. Models: the scene NeRF of ``npu demo``
(8 x 64, 8,192 points per run, encoded inputs), the documented NeRF (8 x 256, 1,024 points)
and the Instant-NGP tiny MLP (64 wide, 4,096 points).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import numpy as np

from npu.compiler import pipeline
from npu.compiler.session import InferenceSession
from npu.models import nerf

_PASSES = ("split_k", "siblings")


def _encode(p: np.ndarray, d: np.ndarray) -> dict[str, np.ndarray]:
    return {"x_enc": nerf.positional_encoding(p, nerf.L_POS),
            "d_enc": nerf.positional_encoding(d, nerf.L_DIR)}


def cases() -> Iterator[tuple[str, Any, dict, list]]:
    """(label, model, feeds, calibration) of each benchmarked model."""
    for label, batch, model in (
            ("scene NeRF 8x64 (demo)", 8192,
             lambda b: nerf.nerf_mlp(b, params=nerf.scene_nerf_params())),
            ("documented NeRF 8x256", 1024, lambda b: nerf.nerf_mlp(b, seed=3))):
        pts, dirs = nerf.ray_points(3 * batch, seed=11)
        calib = [_encode(pts[i * batch:(i + 1) * batch], dirs[i * batch:(i + 1) * batch])
                 for i in range(2)]
        yield label, model(batch), _encode(pts[2 * batch:], dirs[2 * batch:]), calib
    rng = np.random.default_rng(0)
    batch = 4096

    def feed() -> dict[str, np.ndarray]:
        return {"features": rng.standard_normal((batch, 32)).astype(np.float32),
                "sh": nerf.sh_encoding(rng.standard_normal((batch, 3)))}

    yield "Instant-NGP 64", nerf.instant_ngp_mlp(batch, seed=4), feed(), [feed(), feed()]


def measure(model: Any, feeds: dict, calib: list, config: str, lowered: bool
            ) -> dict[str, float]:
    """One run's figures, compiled with or without the MLP lowerings."""
    saved = list(pipeline.PASSES)
    if not lowered:
        pipeline.PASSES[:] = [p for p in saved if p[0] not in _PASSES]
    try:
        sess = InferenceSession(model, config=config, calibration=calib)
    finally:
        pipeline.PASSES[:] = saved
    sess.run(None, feeds)
    pes = sess.compiled.config.pes
    profs = sess.profiles
    cycles = sum(p.cycles for p in profs)
    model_macs = sum(n.plan.macs for n in sess.graph.nodes
                     if n.device == "npu" and n.op == "conv" and n.plan is not None)
    return {"cycles": cycles, "busy": sum(p.macs for p in profs) / (cycles * pes),
            "useful": model_macs / (cycles * pes),
            "read": sum(p.dram_read for p in profs), "written": sum(p.dram_write for p in profs),
            "instructions": sum(seg.program.n_instructions for seg in sess.graph.segments)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="npu16")
    args = ap.parse_args(argv)
    print(f"{'model':24s} {'lowering':8s} {'cycles':>10s} {'busy':>6s} {'useful':>6s} "
          f"{'DRAM read':>10s} {'written':>10s} {'instrs':>7s}")
    for label, model, feeds, calib in cases():
        for lowered in (False, True):
            r = measure(model, feeds, calib, args.config, lowered)
            print(f"{label:24s} {'on' if lowered else 'off':8s} {r['cycles']:10,d} "
                  f"{100 * r['busy']:5.1f}% {100 * r['useful']:5.1f}% {r['read']:10,d} "
                  f"{r['written']:10,d} {r['instructions']:7,d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
