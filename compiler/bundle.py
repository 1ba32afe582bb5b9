"""Saving and loading a compiled model as ``.npub`` program files.

A model compiles to one program per NPU segment. ``save_bundle(compiled, "model.npub")`` writes
segment 0 to ``model.npub`` and segment k >= 1 to ``model.seg<k>.npub``; each file is an
ordinary program (``npu run`` / ``npu profile`` take it on its own). Segment 0's metadata
additionally holds the ``"model"`` record :class:`~npu.compiler.session.InferenceSession` needs
to run the whole model from the files alone:

* ``inputs`` / ``outputs``: the model's graph inputs and outputs (name, shape, dtype);
* ``tensors``: every tensor a binding or host node touches (shape, dtype, layout, scale, zero
  point, physical padding);
* ``host``: the host nodes as a serialized ONNX model (base64), each node's ``doc_string``
  giving the phase it runs in (before segment k), plus the opsets;
* ``segments``: the file of each segment.

Everything is JSON (the program file format forbids pickle).
"""

from __future__ import annotations

import base64
import json
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Node, Placement, Quant, Segment, Tensor
from npu.compiler.pipeline import CompiledModel
from npu.program import Program, load, save

__all__ = ["save_bundle", "load_bundle", "segment_paths"]

BUNDLE_FORMAT = "npu.compiler.bundle/1"


def segment_paths(path: str | PathLike, n: int) -> list[Path]:
    """File names of the ``n`` segments of a bundle saved at ``path``."""
    p = Path(path)
    stem = p.name[:-len(".npub")] if p.name.endswith(".npub") else p.name
    return [p] + [p.with_name(f"{stem}.seg{k}.npub") for k in range(1, n)]


def _tensor_record(t: Tensor) -> dict[str, Any]:
    rec: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype, "layout": t.layout}
    if t.quant is not None:
        rec["scale"] = t.quant.scale
        rec["zero_point"] = t.quant.zero_point
    if t.place is not None and any(t.place.pad):
        rec["pad"] = list(t.place.pad)
        rec["pad_value"] = t.place.pad_value
    return rec


def _host_model(graph: Graph) -> onnx.ModelProto:
    nodes, inits = [], []
    seen: set[str] = set()
    for node in graph.nodes:
        if node.device != "host":
            continue
        proto = node.attrs.get("onnx_node")
        if proto is None:      # an IR reshape moved to the host
            shape_name = f"{node.name}__shape"
            shape = np.array(graph.tensors[node.outputs[0]].shape, dtype=np.int64)
            inits.append(numpy_helper.from_array(shape, shape_name))
            proto = helper.make_node("Reshape", [node.inputs[0], shape_name], node.outputs,
                                     name=node.name)
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(proto)
            proto = copy
            proto.name = node.name
        proto.doc_string = json.dumps({"phase": node.attrs.get("phase", 0),
                                       "reason": node.reason})
        nodes.append(proto)
        for name in proto.input:
            t = graph.tensors.get(name)
            if t is not None and t.is_const and name not in seen:
                seen.add(name)
                inits.append(numpy_helper.from_array(np.asarray(t.data), name))
    g = helper.make_graph(nodes, "host", [], [], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v)
                                               for d, v in graph.opset])


def save_bundle(compiled: CompiledModel, path: str | PathLike) -> list[Path]:
    """Write the programs of ``compiled``; returns the paths written."""
    g = compiled.graph
    if not g.segments:
        raise CompileError("the model has no NPU segment: nothing to save as a program")
    paths = segment_paths(path, len(g.segments))
    names: set[str] = set(g.inputs) | set(g.outputs)
    for node in g.nodes:
        if node.device == "host":
            names.update(node.inputs)
            names.update(node.outputs)
    for seg in g.segments:
        names.update(b.name for b in seg.program.inputs)
        names.update(b.name for b in seg.program.outputs)
    tensors = {n: _tensor_record(g.tensors[n]) for n in sorted(names) if n in g.tensors
               and not g.tensors[n].is_const}
    record = {
        "format": BUNDLE_FORMAT, "name": g.name,
        "inputs": [{"name": n, **_tensor_record(g.tensors[n])} for n in g.inputs],
        "outputs": [{"name": n, **_tensor_record(g.tensors[n])} for n in g.outputs],
        "tensors": tensors,
        "host": base64.b64encode(_host_model(g).SerializeToString()).decode("ascii"),
        "opset": [[d, v] for d, v in g.opset],
        "segments": [p.name for p in paths],
        "report": compiled.report_text(),
    }
    for k, (seg, p) in enumerate(zip(g.segments, paths)):
        prog: Program = seg.program
        meta = dict(prog.metadata)
        if k == 0:
            meta["model"] = record
        out = Program(prog.config, prog.instructions, prog.dram_bytes, prog.segments,
                      prog.inputs, prog.outputs, prog.regions, meta)
        save(out, p)
    return paths


def load_bundle(path: str | PathLike) -> CompiledModel:
    """Rebuild a runnable :class:`CompiledModel` from files written by :func:`save_bundle`."""
    p = Path(path)
    if not p.is_file():
        raise CompileError(f"compiled model {str(p)!r} does not exist")
    first = load(p)
    rec = first.metadata.get("model")
    if not isinstance(rec, dict) or rec.get("format") != BUNDLE_FORMAT:
        raise CompileError(f"{str(p)!r} is a program, not a compiled model (no model record; "
                           f"run it with `npu run`)")
    programs = [first] + [load(p.with_name(n)) for n in rec["segments"][1:]]
    tensors: dict[str, Tensor] = {}
    for name, t in rec["tensors"].items():
        quant = Quant(t["scale"], t["zero_point"]) if "scale" in t else None
        tt = Tensor(name, tuple(t["shape"]), t["dtype"], quant, t.get("layout", ""))
        if "pad" in t:
            tt.place = Placement(0, 0, tuple(t["pad"]), t.get("pad_value", 0))
        tensors[name] = tt
    host = onnx.load_from_string(base64.b64decode(rec["host"]))
    for init in host.graph.initializer:
        arr = numpy_helper.to_array(init)
        tensors[init.name] = Tensor(init.name, tuple(arr.shape), str(arr.dtype), data=arr)
    nodes: list[Node] = []
    for proto in host.graph.node:
        info = json.loads(proto.doc_string or "{}")
        nodes.append(Node("host", proto.name, list(proto.input), list(proto.output),
                          {"onnx_node": proto, "phase": info.get("phase", 0)}, device="host",
                          sources=[proto.name], onnx_op=proto.op_type,
                          reason=info.get("reason", "")))
    graph = Graph(rec["name"], tensors, nodes, [i["name"] for i in rec["inputs"]],
                  [o["name"] for o in rec["outputs"]],
                  opset=[(d, v) for d, v in rec["opset"]])
    for k, prog in enumerate(programs):
        seg = Segment(k, [], [b.name for b in prog.inputs], [b.name for b in prog.outputs])
        seg.program = prog
        graph.segments.append(seg)
    return CompiledModel(graph, first.config, onnx.ModelProto(),
                         saved_report=str(rec.get("report", "")))
