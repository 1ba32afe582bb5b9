"""Schedule quality: how close the compiled programs come to the array's peak.

For ResNet-50 and SqueezeNet (the onnx wheel's light models with seeded weights, see
``npu.models.light``), quantized once by onnxruntime on seeded calibration images, this script
compiles for npu16 and npu32, runs each program on the numba engine and prints, per layer and in
total: cycles, ideal cycles (the model's MACs / PEs), their ratio and the array utilization,
plus the compile time. ``--check`` also compares the outputs with onnxruntime and the float
model. The last line is machine readable::

    schedule_quality model=resnet50 config=npu16 cycles=<n> ideal=<n> utilization=<pct>

Usage: ``python bench/schedule_quality.py [--models resnet50,squeezenet] [--configs
npu16,npu32] [--check] [--quiet]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _quantized(name: str, n_calib: int):
    from npu.compiler.frontend import prepare_model
    from npu.compiler.quantize import quantize_model
    from npu.models.light import light_input, light_model

    model = light_model(name)
    inp = model.graph.input[0].name
    t0 = time.perf_counter()
    qdq = quantize_model(prepare_model(model),
                         [{inp: light_input(1, seed=s)} for s in range(1, 1 + n_calib)])
    return model, qdq, inp, time.perf_counter() - t0


def _layer_rows(compiled, results) -> tuple[list[tuple], int, int]:
    from npu.runtime.profile import Profile

    cfg = compiled.config
    rows, cycles, macs_total = [], 0, 0
    for seg, res in zip(compiled.graph.segments, results):
        meta = {m["name"]: m for m in seg.program.metadata.get("layers", [])}
        prof = Profile.from_result(res)
        for r in prof.regions:
            m = meta.get(r.label, {})
            macs = int(m.get("macs", 0))
            rows.append((r.label, m.get("onnx", ""), r.cycles, macs / cfg.pes))
            macs_total += macs
        cycles += res.cycles
    return rows, cycles, macs_total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet50,squeezenet")
    ap.add_argument("--configs", default="npu16,npu32")
    ap.add_argument("--calibration", type=int, default=4, help="calibration images")
    ap.add_argument("--check", action="store_true",
                    help="compare outputs with onnxruntime and the float model")
    ap.add_argument("--quiet", action="store_true", help="totals only, no per-layer table")
    args = ap.parse_args(argv)

    from npu.compiler.pipeline import compile_model
    from npu.compiler.session import InferenceSession
    from npu.models.light import light_input

    summary = []
    for name in args.models.split(","):
        model, qdq, inp, t_quant = _quantized(name, args.calibration)
        print(f"\n# {name}: onnxruntime quantize_static took {t_quant:.1f} s")
        for config in args.configs.split(","):
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = compile_model(qdq, config)
            t_compile = time.perf_counter() - t0
            cpu_compile = time.process_time() - c0
            sess = InferenceSession(compiled)
            x = light_input(1, seed=100)
            t0 = time.perf_counter()
            sess.run(None, {inp: x})
            t_run = time.perf_counter() - t0
            rows, cycles, macs = _layer_rows(compiled, sess.results)
            ideal = macs / compiled.config.pes
            util = 100.0 * ideal / cycles
            n_instr = sum(p.n_instructions for p in compiled.programs)
            print(f"\n## {name} on {config}: compile {t_compile:.2f} s wall, "
                  f"{cpu_compile:.2f} s CPU ({n_instr:,} "
                  f"instructions, passes: " + ", ".join(
                      f"{k} {v:.2f}" for k, v in compiled.timings.items()) +
                  f"), simulation {t_run:.1f} s")
            if not args.quiet:
                print(f"{'layer':36s} {'op':20s} {'cycles':>11s} {'ideal':>11s} "
                      f"{'ratio':>6s} {'util':>6s}")
                for label, op, c, ide in rows:
                    ratio = c / ide if ide else float("inf")
                    u = 100.0 * ide / c if c else 0.0
                    print(f"{label[:36]:36s} {op[:20]:20s} {c:>11,} {ide:>11,.0f} "
                          f"{ratio:>6.2f} {u:>5.1f}%")
            print(f"{'total':36s} {'':20s} {cycles:>11,} {ideal:>11,.0f} "
                  f"{cycles / ideal:>6.2f} {util:>5.1f}%")
            if args.check:
                _check(model, compiled, sess, inp, x)
            summary.append((name, config, cycles, int(round(ideal)), util, t_compile,
                            cpu_compile))
    print()
    for name, config, cycles, ideal, util, tc, cpu in summary:
        print(f"{name:12s} {config:6s} cycles {cycles:>11,} ideal {ideal:>11,} "
              f"utilization {util:5.1f}%  compile {tc:.2f} s ({cpu:.2f} s CPU)")
    # The machine-readable line: ResNet-50 on npu16 when it was run, else the first result.
    pick = next((s for s in summary if s[:2] == ("resnet50", "npu16")), summary[0])
    name, config, cycles, ideal, util, _, _ = pick
    print(f"schedule_quality model={name} config={config} cycles={cycles} ideal={ideal} "
          f"utilization={util:.1f}")
    return 0


def _check(model, compiled, sess, inp: str, x: np.ndarray) -> None:
    sys.path.insert(0, "tests/compiler")
    from modelcheck import cosine, float_tensor, ort_tensors
    from opmodels import agreement

    logits = [n for n in model.graph.node if n.op_type == "Softmax"][-1].input[0]
    key = f"{logits}_QuantizeLinear_Output"
    # onnxruntime on its integer kernels (QLinearConv, ...: what the NPU reproduces) and on
    # the unfused float QDQ graph.
    ort = ort_tensors(compiled.qdq_model, {inp: x})
    ortf = ort_tensors(compiled.qdq_model, {inp: x}, kernels="float")
    q = compiled.graph.tensors[key].quant
    ours = (sess.tensors[key].astype(np.float32) - q.zero_point) * q.scale
    theirs = (ort[key].astype(np.float32) - q.zero_point) * q.scale
    ref = float_tensor(model, logits, {inp: x})
    same, worst = agreement(sess.tensors[key], ort[key])
    same_f, worst_f = agreement(sess.tensors[key], ortf[key])
    print(f"check: logits int8 identical to onnxruntime's int8 kernels {100 * same:.1f}% "
          f"(max diff {worst}), to its float QDQ graph {100 * same_f:.1f}% (max diff "
          f"{worst_f}); cosine vs onnxruntime {cosine(ours, theirs):.5f}, vs float "
          f"{cosine(ours, ref):.5f} (onnxruntime's int8 vs float {cosine(theirs, ref):.5f}); "
          f"top-1 {int(ours.argmax())} / {int(theirs.argmax())} / {int(ref.argmax())}")


if __name__ == "__main__":
    sys.exit(main())
