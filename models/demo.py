"""``npu demo``: one CNN, one NeRF MLP and one GNN, compiled and run on the simulated NPU.

For each model it prints where every ONNX node ran (NPU segment or host), the cycles of a
run, the ideal cycles (MACs / PEs), array utilization, DRAM traffic, and the accuracy against
float onnxruntime; it writes the Perfetto traces (open them at https://ui.perfetto.dev), the
profile plots and the NeRF renders into the output folder, which it names at the end.

The models: the digits CNN on the 359 test digits (one batch), the scene NeRF rendering a
100x100 view (64 samples per ray, 8,192 points per NPU run), and the GCN on karate club.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import checks, nerf

#: Where the demo writes unless told otherwise.
DEFAULT_OUT = Path("out") / "demo"


@dataclass
class DemoModel:
    """What the demo measured for one model (``runs`` NPU runs of the same program)."""

    name: str
    description: str
    placement: list[dict[str, str]] = field(default_factory=list)
    runs: int = 1
    cycles: int = 0  # per run, all segments
    ideal_cycles: float = 0.0  # per run
    macs: int = 0
    dram_read: int = 0
    dram_write: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def utilization(self) -> float:
        return self.ideal_cycles / self.cycles if self.cycles else 0.0


def _profile(m: DemoModel, session: Any, out: Path, runs: int = 1) -> None:
    """Cycles, MACs and DRAM of the last run's segments; traces and plots written."""
    pes = session.compiled.config.pes
    m.runs = runs
    m.placement = session.report()["nodes"]
    for k, prof in enumerate(session.profiles):
        m.cycles += prof.cycles
        m.macs += prof.macs
        m.dram_read += prof.dram_read
        m.dram_write += prof.dram_write
        stem = m.name if len(session.profiles) == 1 else f"{m.name}_segment{k}"
        trace, plot = out / f"{stem}.trace.json", out / f"{stem}.profile.png"
        prof.write_perfetto(trace)
        prof.plot(plot)
        m.files += [trace, plot]
    m.ideal_cycles = m.macs / pes


def _digits(out: Path, config: str, quick: bool) -> DemoModel:
    m = DemoModel("digits_cnn", "CNN trained on sklearn digits, 359 test images in one batch")
    r = checks.digits_check(config, n_images=64 if quick else None)
    _profile(m, r.session, out)
    m.accuracy = {"float accuracy": r.float_accuracy, "NPU accuracy": r.npu_accuracy}
    return m


def _nerf(out: Path, config: str, quick: bool) -> DemoModel:
    size = 32 if quick else 100
    m = DemoModel("nerf_scene", f"NeRF MLP 8x64 (trained here), {size}x{size} view, "
                                "64 samples/ray, near 2, far 6")
    r = checks.nerf_check(config, size=size, batch=4096 if quick else checks.NERF_BATCH,
                          progress=True)
    _profile(m, r.session, out, runs=r.runs)
    m.accuracy = {"PSNR NPU vs float (dB)": r.psnr_npu_vs_float,
                  "PSNR float vs truth (dB)": r.psnr_float_vs_truth,
                  "PSNR NPU vs truth (dB)": r.psnr_npu_vs_truth}
    for name, img in (("npu", r.npu_image), ("float", r.float_image), ("truth", r.truth)):
        m.files.append(nerf.save_png(out / f"nerf_{name}.png", img))
    side = np.concatenate([r.truth, r.float_image, r.npu_image], axis=1)
    m.files.append(nerf.save_png(out / "nerf_truth_float_npu.png", side))
    return m


def _gcn(out: Path, config: str, quick: bool) -> DemoModel:
    m = DemoModel("gcn_karate", "2-layer GCN (trained here) on Zachary's karate club")
    r = checks.karate_check("gcn", config)
    _profile(m, r.session, out)
    m.accuracy = {"agreement with float": r.agreement, "float accuracy": r.float_accuracy,
                  "NPU accuracy": r.npu_accuracy}
    return m


DEMOS: dict[str, Callable[[Path, str, bool], DemoModel]] = {
    "digits_cnn": _digits, "nerf_scene": _nerf, "gcn_karate": _gcn}


def _placement_lines(m: DemoModel) -> list[str]:
    """Where each node ran, one line per node, borders (Quantize/Dequantize) folded."""
    lines = []
    borders = 0
    seen: set[tuple[str, str]] = set()
    for row in m.placement:
        if row["op"] in ("QuantizeLinear", "DequantizeLinear") and row["where"] == "host":
            borders += 1
            continue
        if (row["node"], row["where"]) in seen:  # an IR node made of several ONNX pieces
            continue
        seen.add((row["node"], row["where"]))
        lines.append(f"    {row['node'][:34]:34s} {row['op'][:18]:18s} {row['where']}"
                     + (f"  ({row['reason']})" if row.get("reason") else ""))
    if borders:
        lines.append(f"    (+ {borders} Quantize/DequantizeLinear at host/NPU borders)")
    return lines


def format_summary(models: list[DemoModel], config: str) -> str:
    """The demo's final table."""
    head = (f"{'model':12s} {'runs':>5s} {'cycles/run':>12s} {'ideal':>12s} {'util':>6s} "
            f"{'DRAM rd/run':>12s} {'DRAM wr/run':>12s}  accuracy")
    lines = [f"npu demo on {config}", head, "-" * len(head)]
    for m in models:
        if m.error:
            lines.append(f"{m.name:12s} FAILED: {m.error}")
            continue
        acc = ", ".join(f"{k} {v:.4g}" for k, v in m.accuracy.items())
        lines.append(f"{m.name:12s} {m.runs:5d} {m.cycles:12,d} {m.ideal_cycles:12,.0f} "
                     f"{100 * m.utilization:5.1f}% {m.dram_read:12,d} {m.dram_write:12,d}  "
                     f"{acc}")
    return "\n".join(lines)


def run_demo(out_dir: str | Path | None = None, config: str = "npu16", quick: bool = False,
             models: list[str] | None = None, echo: Callable[[str], None] = print
             ) -> list[DemoModel]:
    """Run the demo; returns what it measured (a model that failed has ``error`` set).

    ``quick`` shrinks the inputs (64 digits, a 32x32 view) for tests; ``models`` picks a
    subset of :data:`DEMOS`.
    """
    from tqdm import tqdm

    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    names = list(DEMOS) if models is None else models
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise ValueError(f"unknown demo model(s) {unknown}; choose from {list(DEMOS)}")
    results: list[DemoModel] = []
    t_all = time.time()
    for name in tqdm(names, desc="npu demo", unit="model", leave=False):
        t0 = time.time()
        try:
            m = DEMOS[name](out, config, quick)
        except Exception as exc:  # one broken model must not hide the others
            m = DemoModel(name, "", error=f"{type(exc).__name__}: {exc}")
            (out / f"{name}.error.txt").write_text(traceback.format_exc())
        m.seconds = time.time() - t0
        results.append(m)
        echo(f"\n== {m.name}: {m.description} ({m.seconds:.1f} s)")
        if m.error:
            echo(f"   FAILED: {m.error} (traceback in {out / (name + '.error.txt')})")
            continue
        echo("   where each node ran:")
        for line in _placement_lines(m):
            echo(line)
        echo(f"   cycles per run {m.cycles:,} (ideal {m.ideal_cycles:,.0f}, utilization "
             f"{100 * m.utilization:.1f}%), DRAM read {m.dram_read:,} B, written "
             f"{m.dram_write:,} B" + (f", {m.runs} runs" if m.runs > 1 else ""))
        echo("   " + ", ".join(f"{k}: {v:.4g}" for k, v in m.accuracy.items()))
    echo("")
    echo(format_summary(results, config))
    echo(f"\nfinished in {time.time() - t_all:.0f} s; traces (open in https://ui.perfetto.dev),"
         f" plots and renders are in {out.resolve()}")
    return results
