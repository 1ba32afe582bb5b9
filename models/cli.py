"""The ``npu demo`` subcommand (registered by ``npu.cli``)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit status 1 when a model failed."""
    from .demo import DEMOS, run_demo

    models = args.models.split(",") if args.models else None
    if models:
        unknown = [m for m in models if m not in DEMOS]
        if unknown:  # ModelError: npu.cli prints it as a user error (exit status 2)
            from ._onnx import ModelError

            raise ModelError(f"unknown demo model(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(DEMOS)}")
    results = run_demo(args.out, config=args.config, quick=args.quick, models=models)
    return 1 if any(r.error for r in results) else 0


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    from .demo import DEFAULT_OUT

    p = subparsers.add_parser(
        "demo", help="compile and run a CNN, a NeRF MLP and a GNN on the simulated NPU",
        description="The main job: the digits CNN (359 test images), the NeRF MLP trained on a "
                    "procedural scene (a 100x100 view, 64 samples per ray) and a GCN on "
                    "karate club are compiled for the NPU, run on the cycle-exact simulator and "
                    "checked against float onnxruntime. Prints, per model, where each node "
                    "ran, cycles, ideal cycles, utilization, DRAM traffic and accuracy; writes "
                    "Perfetto traces, profile plots and the NeRF renders. About a minute.",
        epilog="example: npu demo --out out/demo   (then open out/demo/*.trace.json in "
               "https://ui.perfetto.dev)")
    p.add_argument("-o", "--out", default=str(DEFAULT_OUT), metavar="DIR",
                   help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--config", default="npu16", help="NPU configuration (default npu16)")
    p.add_argument("--models", metavar="LIST",
                   help="comma-separated subset of digits_cnn,nerf_scene,gcn_karate")
    p.add_argument("--quick", action="store_true",
                   help="smaller inputs (64 digits, a 32x32 view): a few seconds")
    p.set_defaults(func=cmd_demo)
