"""The compiler driver: ONNX in, programs (one per NPU segment) plus host work out.

:func:`compile_model` runs, in order (``dump`` receives the IR after each IR pass)::

    frontend.prepare_model      load, check, static shapes, fold constants/BatchNorm
    quantize.quantize_model     onnxruntime quantize_static (unless already QDQ)
    passes.legalize             QDQ ONNX -> IR (NPU nodes, host nodes)
    passes.mlp.split_k          concats read only by matmuls -> split-K matmuls (no copy)
    passes.fuse                 residual adds, Relu/Clip, concat views into epilogues
    passes.layout               NHWC on the NPU; reshapes as aliases or weight permutations
    passes.mlp.fuse_siblings    matmuls reading the same input -> one matmul, sliced outputs
    passes.partition            segments; strict mode
    passes.tile                 tiles, K groups, weight residency (from NPUConfig)
    passes.schedule             on-chip buffers per node
    passes.allocate             DRAM plan per segment with lifetime-based reuse
    passes.emit                 instructions, tokens, programs

and returns a :class:`CompiledModel`, which :class:`npu.compiler.session.InferenceSession`
runs and :mod:`npu.compiler.bundle` saves as ``.npub`` files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from npu.compiler.errors import CompileError
from npu.compiler.frontend import ModelSource, prepare_model
from npu.compiler.ir import Graph, dump
from npu.compiler.passes import allocate, emit, fuse, layout, legalize, partition, schedule, tile
from npu.compiler.passes.families import lower as lower_families
from npu.compiler.passes.families import sparse_blocks
from npu.compiler.passes.mlp import describe as describe_lowering
from npu.compiler.passes.mlp import fuse_siblings, split_k
from npu.compiler.passes.partition import is_border_conversion, placement_report
from npu.compiler.quantize import Calibration, is_qdq, quantize_model
from npu.isa import NPUConfig, get_config
from npu.program import Program

__all__ = ["CompiledModel", "compile_model", "PASSES"]

#: IR passes in order: (name, function(graph, config, options) -> graph).
PASSES: list[tuple[str, Callable[[Graph, NPUConfig, dict[str, Any]], Graph]]] = [
    ("families", lambda g, c, o: lower_families(g)),
    ("split_k", lambda g, c, o: split_k(g)),
    ("fuse", lambda g, c, o: fuse.fuse(g)),
    ("layout", lambda g, c, o: layout.layout(g)),
    ("siblings", lambda g, c, o: fuse_siblings(g, c.cols)),
    ("partition", lambda g, c, o: partition.partition(g, strict=o.get("strict", False),
                                                     observe=o.get("observe", ()))),
    ("tile", lambda g, c, o: tile.tile(g, c)),
    ("schedule", lambda g, c, o: schedule.schedule(g, c)),
    ("allocate", lambda g, c, o: allocate.allocate(g, c)),
    ("emit", lambda g, c, o: emit.emit(g, c, o.get("progress_bar"))),
]


@dataclass
class CompiledModel:
    """Everything needed to run a model: its IR (with host nodes), programs and report."""

    graph: Graph
    config: NPUConfig
    qdq_model: onnx.ModelProto
    timings: dict[str, float] = field(default_factory=dict)
    saved_report: str = ""     # the report text of a model loaded from .npub files

    @property
    def programs(self) -> list[Program]:
        return [seg.program for seg in self.graph.segments]

    def report(self) -> dict[str, Any]:
        """The compile report: where every ONNX node runs, segments, layers, timings."""
        g = self.graph
        fallbacks = [r for r, n in zip(placement_report(g), _report_nodes(g))
                     if n.device == "host" and not is_border_conversion(n, g)]
        segs = []
        for seg in g.segments:
            prog = seg.program
            layers = []
            for name in seg.nodes:
                node = g.node(name)
                layers.append({"name": name, "op": node.op, "onnx": node.onnx_op,
                               "plan": str(node.plan) if node.plan is not None else "",
                               "skipped_blocks": sparse_blocks(node),
                               "lowering": describe_lowering(node)})
            segs.append({"index": seg.index, "inputs": seg.inputs, "outputs": seg.outputs,
                         "instructions": prog.n_instructions if prog else 0,
                         "dram_bytes": seg.stats.get("dram_bytes", 0),
                         "const_bytes": seg.stats.get("const_bytes", 0), "layers": layers})
        return {"model": g.name, "config": self.config.name,
                "nodes": placement_report(g), "host_fallbacks": fallbacks,
                "segments": segs, "timings": dict(self.timings)}

    def report_text(self) -> str:
        """The report as a readable table."""
        if self.saved_report:
            return self.saved_report
        rep = self.report()
        lines = [f"model {rep['model']} for {rep['config']}: {len(rep['segments'])} NPU "
                 f"segment(s), {len(rep['host_fallbacks'])} host fallback node(s)"]
        lines.append(f"{'node':40s} {'op':22s} {'runs on':8s} note")
        for r in rep["nodes"]:
            lines.append(f"{r['node'][:40]:40s} {r['op'][:22]:22s} {r['where']:8s} "
                         f"{r['reason']}")
        for s in rep["segments"]:
            lines.append(f"segment {s['index']}: {s['instructions']} instructions, DRAM "
                         f"{s['dram_bytes']} B ({s['const_bytes']} B constants)")
            for layer in s["layers"]:
                if layer["plan"]:
                    skip = layer.get("skipped_blocks")
                    note = f"; skipped {skip[0]}/{skip[1]} all-zero weight blocks" \
                        if skip and skip[0] else ""
                    if layer.get("lowering"):
                        note += f"; {layer['lowering']}"
                    lines.append(f"  {layer['name'][:36]:36s} {layer['plan']}{note}")
        lines.append("compile time: " + ", ".join(f"{k} {v:.2f}s"
                                                  for k, v in rep["timings"].items()))
        return "\n".join(lines)


def _report_nodes(g: Graph) -> list[Any]:
    out = []
    for node in g.nodes:
        out.extend([node] * max(1, len(node.sources)))
    return out


def compile_model(model: ModelSource, config: str | NPUConfig = "npu16",
                  calibration: Calibration | None = None, *, strict: bool = False,
                  batch: int | None = None, dump: Callable[[str, str], None] | None = None,
                  progress: bool = False, observe: Any = (),
                  quantize_all: bool = False) -> CompiledModel:
    """Compile an ONNX model (float + calibration, or QDQ) for ``config``.

    ``dump(pass_name, text)`` is called with the IR after every IR pass (``--dump-ir``);
    ``progress`` shows a progress bar over the emitted layers; ``observe`` names intermediate
    tensors (or ``"all"``) the programs also store, for debugging; ``quantize_all`` makes
    onnxruntime quantize every op type (see :func:`npu.compiler.quantize.quantize_model`).
    """
    cfg = get_config(config)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare_model(model, batch)
    timings["frontend"] = time.perf_counter() - t0
    if not is_qdq(prepared):
        t0 = time.perf_counter()
        qdq = quantize_model(prepared, calibration, all_ops=quantize_all)
        timings["quantize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        qdq = prepare_model(qdq)
        timings["frontend"] += time.perf_counter() - t0
    else:
        qdq = prepared
    t0 = time.perf_counter()
    graph = legalize.legalize(qdq)
    timings["legalize"] = time.perf_counter() - t0
    if dump is not None:
        dump("legalize", dump_text(graph, "after legalize"))
    options: dict[str, Any] = {"strict": strict, "observe": observe}
    bar = None
    for name, fn in PASSES:
        if name == "emit" and progress:
            from tqdm import tqdm

            n_layers = sum(1 for n in graph.nodes if n.device == "npu" and n.plan is not None)
            bar = tqdm(total=n_layers, desc="emit", unit="layer", leave=False)
            options["progress_bar"] = bar
        t0 = time.perf_counter()
        try:
            graph = fn(graph, cfg, options)
        except CompileError:
            raise
        finally:
            if bar is not None and name == "emit":
                bar.close()
        timings[name] = time.perf_counter() - t0
        if dump is not None:
            dump(name, dump_text(graph, f"after {name}"))
    return CompiledModel(graph, cfg, qdq, timings)


def dump_text(graph: Graph, title: str) -> str:
    """The IR listing printed by ``--dump-ir``, with buffers and programs when known."""
    text = dump(graph, title)
    extra = []
    for node in graph.nodes:
        buf = node.attrs.get("buffers")
        if buf is not None:
            extra.append(f"  {node.name}: {buf}")
    for seg in graph.segments:
        if seg.program is not None:
            p = seg.program
            extra.append(f"  segment {seg.index}: {p.n_instructions} instructions "
                         f"{p.metadata.get('instructions')}, tokens {p.metadata.get('tokens')}")
    return text + ("\n" + "\n".join(extra) if extra else "")
