"""``npu compile`` and ``npu profile MODEL.onnx``.

``npu compile model.onnx -o model.npub [--config npu16] [--calibration data.npz] [--strict]
[--dump-ir] [--report]`` compiles a float model (with calibration data) or a QDQ model into one
program per NPU segment (see :mod:`npu.compiler.bundle`) and prints a summary.

``npu profile model.onnx --input NAME=x.npy`` (the runtime's ``profile`` command routes
``.onnx`` files here through ``register_profile_source``) compiles, runs the whole model and
profiles its NPU work: the runtime's per-layer table and engine figures, the trace and plots,
preceded by a per-layer table with the *model's* MACs (ideal cycles = MACs / PEs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from npu.compiler.errors import CompileError

__all__ = ["add_parser", "cmd_compile", "profile_onnx", "layer_table"]


def _calibration(args: argparse.Namespace) -> Any:
    if getattr(args, "calibration", None):
        return args.calibration
    return None


def cmd_compile(args: argparse.Namespace) -> int:
    from npu.compiler.bundle import save_bundle
    from npu.compiler.pipeline import compile_model

    dump = None
    if args.dump_ir:
        def dump(name: str, text: str) -> None:
            print(text)
            print()
    t0 = time.perf_counter()
    compiled = compile_model(args.model, args.config, _calibration(args), strict=args.strict,
                             batch=args.batch, dump=dump,
                             progress=sys.stderr.isatty() if args.progress is None
                             else args.progress)
    elapsed = time.perf_counter() - t0
    out = args.output or str(Path(args.model).with_suffix(".npub"))
    if compiled.graph.segments:
        paths = save_bundle(compiled, out)
    else:
        paths = []
    rep = compiled.report()
    if args.report:
        print(compiled.report_text())
    n_instr = sum(p.n_instructions for p in compiled.programs)
    print(f"compiled {args.model} for {compiled.config.name} in {elapsed:.1f} s: "
          f"{len(compiled.graph.segments)} NPU segment(s), {n_instr} instructions, "
          f"{len(rep['host_fallbacks'])} host fallback node(s)")
    for r in rep["host_fallbacks"]:
        print(f"  host: {r['node']} ({r['op']}): {r['reason']}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def layer_table(compiled: Any, results: list[Any]) -> str:
    """Per-layer cycles, model MACs, ideal cycles, utilization and DRAM bytes of a run."""
    from npu.runtime.profile import Profile

    cfg = compiled.config
    lines = [f"{'layer':34s} {'op':18s} {'cycles':>10s} {'MACs':>13s} {'ideal':>10s} "
             f"{'util':>6s} {'DRAM rd':>10s} {'DRAM wr':>10s}"]
    tot_c = tot_m = 0
    for seg, res in zip(compiled.graph.segments, results):
        prof = Profile.from_result(res)
        macs = {m["name"]: m["macs"] for m in seg.program.metadata.get("layers", [])}
        for r in prof.regions:
            m = macs.get(r.label, 0)
            ideal = m / cfg.pes
            util = 100 * ideal / r.cycles if r.cycles else 0.0
            op = next((x["onnx"] for x in seg.program.metadata.get("layers", [])
                       if x["name"] == r.label), "")
            lines.append(f"{r.label[:34]:34s} {op[:18]:18s} {r.cycles:>10,} {m:>13,} "
                         f"{ideal:>10,.0f} {util:>5.1f}% {r.dram_read:>10,} {r.dram_write:>10,}")
            tot_m += m
        tot_c += res.cycles
    lines.append(f"{'total':34s} {'':18s} {tot_c:>10,} {tot_m:>13,} {tot_m / cfg.pes:>10,.0f} "
                 f"{100 * tot_m / cfg.pes / max(tot_c, 1):>5.1f}%")
    return "\n".join(lines)


def profile_onnx(args: argparse.Namespace) -> Any:
    """Compile, run and return the RunResult of the model's main segment for ``npu profile``."""
    from npu.compiler.session import InferenceSession
    from npu.runtime.cli import UsageError, parse_inputs

    arrays = parse_inputs(args.input)
    try:
        calibration = _calibration(args)
        if calibration is None and arrays:
            calibration = [arrays]        # calibrate on the profiled input itself
        sess = InferenceSession(args.program, getattr(args, "config", "npu16") or "npu16",
                                calibration, engine=args.engine,
                                batch=getattr(args, "batch", None))
        feeds = {}
        for inp in sess.get_inputs():
            if inp.name not in arrays:
                if arrays:
                    raise UsageError(f"missing --input {inp.name}=FILE.npy")
                feeds[inp.name] = np.zeros(inp.shape, dtype=np.float32)
                print(f"note: no --input given; feeding zeros to {inp.name}", file=sys.stderr)
            else:
                feeds[inp.name] = arrays[inp.name]
        sess.run(None, feeds)
    except CompileError as exc:
        raise UsageError(str(exc)) from None
    print(layer_table(sess.compiled, sess.results))
    print()
    # The runtime prints the profile of one program: the segment with the most cycles.
    return max(sess.results, key=lambda r: r.cycles)


def _profile_arguments(p: argparse.ArgumentParser) -> None:
    known = {a for action in p._actions for a in action.option_strings}
    if "--config" not in known:
        p.add_argument("--config", default="npu16",
                       help="(.onnx) machine config: a preset (npu4..npu128) or a JSON file")
    if "--calibration" not in known:
        p.add_argument("--calibration", metavar="DATA.npz",
                       help="(.onnx) calibration data for a float model: arrays named like the "
                            "model's inputs, samples along axis 0 (default: the --input data)")
    if "--batch" not in known:
        p.add_argument("--batch", type=int, help="(.onnx) bind a dynamic batch dimension")


def add_parser(subparsers: Any) -> None:
    """Register ``compile`` and route ``npu profile *.onnx`` here."""
    p = subparsers.add_parser(
        "compile", help="compile an ONNX model into NPU programs",
        description="Compile an ONNX model for an NPU config: a float model is quantized with "
                    "onnxruntime's quantize_static on the calibration data (QDQ, per-channel "
                    "int8 weights, int8 activations); a QDQ model is taken as it is. Operators "
                    "the NPU does not run stay on the host (listed; --strict forbids them). "
                    "Writes one program per NPU segment: OUT.npub, OUT.seg1.npub, ...",
        epilog="example: npu compile resnet50.onnx -o resnet50.npub --calibration calib.npz")
    p.add_argument("model", help="ONNX model (.onnx), float or QDQ")
    p.add_argument("-o", "--output", metavar="OUT.npub",
                   help="program file to write (default: the model's name with .npub)")
    p.add_argument("--config", default="npu16",
                   help="machine config: a preset (npu4, npu8, npu16, npu32, npu128) or a .json "
                        "file (default npu16)")
    p.add_argument("--calibration", metavar="DATA.npz",
                   help="calibration data for a float model: one array per model input, named "
                        "like it, samples stacked along axis 0")
    p.add_argument("--batch", type=int, help="bind a dynamic batch dimension to this size")
    p.add_argument("--strict", action="store_true",
                   help="fail instead of running any operator on the host")
    p.add_argument("--dump-ir", action="store_true", help="print the IR after every pass")
    p.add_argument("--report", action="store_true",
                   help="print where every ONNX node runs and each layer's tiling")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar while emitting (default: when stderr is a terminal)")
    p.set_defaults(func=cmd_compile)
    try:
        from npu.runtime.cli import register_profile_source
    except ImportError:   # runtime without the profile command
        return
    register_profile_source(".onnx", profile_onnx, _profile_arguments)
