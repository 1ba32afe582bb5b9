"""Fuse: fold elementwise work into the vector stage of the node that produces its input.

* An ``add`` whose operand comes from a node with a vector stage (``conv``, pools, ``add``,
  ``clamp``, ``copy``), used by nothing else, becomes an epilogue step of that node: the tile
  is requantized by VECTOR, then ELTWISE-added to the other operand's tile, before it is ever
  stored (the residual add of ResNet costs no extra DRAM traffic).
* A ``clamp`` (Relu/Clip) likewise; when it keeps the quantization it only narrows the clamp
  range of the producer (no extra instruction).
* ``concat`` inputs are written in place: their producer stores straight into the output at a
  channel offset (a *view*), with a rescale step when the scales differ; inputs that cannot be
  (graph inputs, tensors used twice) get a ``copy`` node.

Every fusion keeps onnxruntime's arithmetic exactly: each Q/DQ pair of the QDQ model is still a
rounding of its own (VECTOR, then each ELTWISE step).
"""

from __future__ import annotations

import dataclasses
import math

from npu.compiler.ir import Graph, Node, Step
from npu.compiler.qmath import is_identity

__all__ = ["fuse", "EPILOGUE_OPS"]

#: Node kinds that end in a vector stage and can take epilogue steps.
EPILOGUE_OPS = ("conv", "avgpool", "maxpool", "add", "clamp", "copy")


def _index(graph: Graph) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(graph.nodes)}


def _only_user(graph: Graph, t: str, user: Node) -> bool:
    users = graph.consumers().get(t, [])
    return len(users) == 1 and users[0] is user and users[0].inputs.count(t) == 1 and \
        t not in graph.outputs


def _swap(step: Step, other: str) -> Step:
    return dataclasses.replace(step, a_zero=step.b_zero, a_mult=step.b_mult,
                               b_zero=step.a_zero, b_mult=step.a_mult, other=other)


def _absorb(producer: Node, consumer: Node, steps: list[Step], graph: Graph) -> None:
    """Append ``steps`` to ``producer`` and let it write ``consumer``'s output."""
    eps = producer.attrs.setdefault("epilogue", [])
    for st in steps:
        if is_identity(st):
            continue
        if st.kind == "rescale" and st.a_zero == st.zero_point and st.b_mult == 0 and \
                st.a_mult == 1 << st.shift:
            # Same quantization: only the clamp range narrows.
            if eps:
                last = eps[-1]
                last.clamp_min = max(last.clamp_min, st.clamp_min)
                last.clamp_max = min(last.clamp_max, st.clamp_max)
                continue
            if "clamp" in producer.attrs:
                lo, hi = producer.attrs["clamp"]
                producer.attrs["clamp"] = (max(lo, st.clamp_min), min(hi, st.clamp_max))
                continue
        eps.append(st)
    old = producer.outputs[0]
    producer.outputs = list(consumer.outputs)
    producer.sources += consumer.sources
    producer.onnx_op = f"{producer.onnx_op}+{consumer.onnx_op}"
    graph.tensors.pop(old, None)
    graph.nodes.remove(consumer)


def _fuse_elementwise(graph: Graph) -> bool:
    producer = graph.producer()
    order = _index(graph)
    for node in list(graph.nodes):
        if node.device != "npu" or node.op not in ("add", "clamp"):
            continue
        for pos, t in enumerate(node.inputs):
            prod = producer.get(t)
            if prod is None or prod.device != "npu" or prod.op not in EPILOGUE_OPS:
                continue
            if not _only_user(graph, t, node):
                continue
            steps = [dataclasses.replace(s) for s in node.attrs["epilogue"]]
            if node.op == "add":
                other = node.inputs[1 - pos]
                op = producer.get(other)
                if op is not None and order[op.name] > order[prod.name]:
                    continue  # the other operand is not ready when prod runs
                if other == t:
                    continue
                steps[0] = steps[0] if pos == 0 else _swap(steps[0], node.inputs[0])
                steps[0].other = other
            _absorb(prod, node, steps, graph)
            return True
    return False


def _fuse_concat(graph: Graph) -> None:
    producer = graph.producer()
    for node in list(graph.nodes):
        if node.device != "npu" or node.op != "concat":
            continue
        y = graph.tensors[node.outputs[0]]
        axis = node.attrs["axis"]
        generic = node.attrs.get("generic", False)
        # Element offset of each input along the concat axis, in units of the view's channels:
        # the channel axis itself, or for a generic axis everything from it on.
        inner = int(math.prod(y.shape[axis + 1:])) if generic else 1
        off = 0
        views = []
        for t, step in zip(node.inputs, node.attrs["rescale"]):
            tt = graph.tensors[t]
            c = tt.shape[axis]
            prod = producer.get(t)
            if not generic and prod is not None and prod.device == "npu" and \
                    prod.op in EPILOGUE_OPS and _only_user(graph, t, node) and tt.view_of is None:
                if not is_identity(step):
                    prod.attrs.setdefault("epilogue", []).append(step)
                tt.view_of = (y.name, off)
                tt.quant = y.quant      # the producer now writes the concat's quantization
                views.append(t)
            else:
                v = graph.fresh(f"{t}__in_{y.name}")
                graph.tensors[v] = dataclasses.replace(tt, name=v, view_of=(y.name, off * inner),
                                                       data=None, place=None, alias_of=None,
                                                       quant=y.quant)
                attrs: dict = {"epilogue": [] if is_identity(step) else [step]}
                if generic:
                    # Both sides seen as (prod(shape[:axis]), prod(shape[axis:])) rows.
                    graph.tensors[v].split = axis
                    graph.tensors[v].view_stride = int(math.prod(y.shape[axis:]))
                    attrs["in_split"] = axis
                copy = Node("copy", graph.fresh(f"{node.name}/copy{len(views)}"), [t], [v],
                            attrs, sources=list(node.sources), onnx_op="Concat")
                graph.nodes.insert(graph.nodes.index(node), copy)
                views.append(v)
            off += c
        node.inputs = views


def fuse(graph: Graph) -> Graph:
    """Apply the fusions above until none applies."""
    while _fuse_elementwise(graph):
        pass
    _fuse_concat(graph)
    return graph
