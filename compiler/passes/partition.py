"""Partition: NPU segments and host nodes, and the compile report's placement table.

NPU nodes are grouped into *segments*, each compiled into one program. A host node depending
on segment k forces everything NPU that depends on it into a later segment: the *level* of an
NPU node is the largest level among its inputs, a host node's level is one more than that of
any NPU node it depends on, and segment k holds the NPU nodes of level k. At run time the
session alternates: host nodes that are ready, then the next segment, and so on.

``strict=True`` makes any host node an error, except the QuantizeLinear of graph inputs and the
DequantizeLinear of graph outputs (converting the model's float I/O is always the host's job).
"""

from __future__ import annotations

from typing import Any

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Node, Segment

__all__ = ["partition", "is_border_conversion", "placement_report"]


def is_border_conversion(node: Node, graph: Graph) -> bool:
    """Q of a graph input or DQ producing a graph output: I/O conversion, not a fallback."""
    if node.device != "host":
        return False
    if node.onnx_op == "QuantizeLinear" and node.inputs and node.inputs[0] in graph.inputs:
        return True
    if node.onnx_op == "DequantizeLinear" and node.outputs and node.outputs[0] in graph.outputs:
        return True
    return False


def partition(graph: Graph, strict: bool = False, observe: Any = ()) -> Graph:
    """Assign ``Node.segment`` and build ``graph.segments``.

    ``observe`` names extra tensors (or ``"all"``) every segment also stores as outputs, so a
    session can compare intermediate int8 values (debugging, tests).
    """
    if strict:
        bad = [n for n in graph.nodes if n.device == "host" and
               not is_border_conversion(n, graph)]
        if bad:
            lines = ", ".join(f"{n.name} ({n.onnx_op}: {n.reason})" for n in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise CompileError(f"strict mode: {len(bad)} node(s) would run on the host: "
                               f"{lines}{more}")
    _segment_levels(graph)
    segs = _group(graph)
    idle = [k for k, nodes in segs.items() if all(n.op in _NO_WORK for n in nodes)]
    if idle:
        # A segment that would only rename bytes (a reshape between host nodes) is not worth a
        # program: its nodes run on the host (numpy reshape).
        for k in idle:
            for n in segs[k]:
                n.device = "host"
                n.reason = "nothing to compute between host nodes"
        _segment_levels(graph)
        segs = _group(graph)
    if sorted(segs) != list(range(len(segs))):
        raise CompileError(f"internal: segment levels {sorted(segs)} are not contiguous")
    graph.segments = [_segment(graph, k, segs[k], observe) for k in range(len(segs))]
    return graph


_NO_WORK = ("reshape",)


def _group(graph: Graph) -> dict[int, list[Node]]:
    segs: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.device == "npu":
            segs.setdefault(node.segment, []).append(node)
    return segs


def _segment_levels(graph: Graph) -> None:
    """Set Node.segment of NPU nodes and attrs['phase'] of host nodes."""
    # Phases: host phase k is 2k, segment k is 2k+1. A tensor is available after the phase
    # producing it; graph inputs and constants before anything.
    avail: dict[str, int] = {}
    for node in graph.nodes:
        ins = [avail.get(t, 0) for t in node.inputs + [s.other for s in
                                                        node.attrs.get("epilogue", [])
                                                        if s.other is not None]]
        if node.device == "npu":
            k = max((a // 2 for a in ins), default=0)
            node.segment = k
            phase = 2 * k + 1
        else:
            phase = 2 * max(((a + 1) // 2 for a in ins), default=0)
            node.attrs["phase"] = phase // 2    # runs before segment phase//2 (after k-1)
        for o in node.outputs:
            avail[o] = phase
    _colocate_views(graph)


def _colocate_views(graph: Graph) -> None:
    """Move the nodes writing a concat's views into the concat's segment.

    A view's bytes live in its base tensor, which only the concat's segment holds; a copy of
    an early input (e.g. a graph input) would otherwise land in an earlier segment and write
    into that segment's DRAM. Views are read by nothing but their concat, so running their
    producers later is safe. Reverse order lets nested concats pass their segment down.
    """
    producer = graph.producer()
    for node in reversed(graph.nodes):
        if node.device != "npu" or node.op != "concat":
            continue
        for t in node.inputs:
            p = producer.get(t)
            tt = graph.tensors.get(t)
            if p is not None and p.device == "npu" and tt is not None and \
                    tt.view_of is not None and p.segment < node.segment:
                p.segment = node.segment


def _segment(graph: Graph, idx: int, nodes: list[Node], observe: Any) -> Segment:
    names = {n.name for n in nodes}
    produced: set[str] = set()
    for n in nodes:
        produced.update(n.outputs)
    inputs: list[str] = []
    for n in nodes:
        for t in n.inputs + [s.other for s in n.attrs.get("epilogue", []) if s.other]:
            tt = graph.tensors.get(t)
            if tt is None or tt.is_const:
                continue
            if t not in produced and t not in inputs:
                inputs.append(t)
    outputs: list[str] = []
    for n in graph.nodes:
        if n.name in names:
            continue
        for t in n.inputs + [s.other for s in n.attrs.get("epilogue", []) if s.other]:
            if t in produced and t not in outputs:
                outputs.append(t)
    for t in graph.outputs:
        if t in produced and t not in outputs:
            outputs.append(t)
    for t in sorted(produced):
        if (observe == "all" or t in observe) and t not in outputs and \
                graph.tensors[t].alias_of is None:
            outputs.append(t)
    # A concat view is written in place: the segment stores its base.
    outputs = [_base(graph, t) for t in outputs]
    return Segment(idx, [n.name for n in nodes], inputs, list(dict.fromkeys(outputs)))


def _base(graph: Graph, t: str) -> str:
    tt = graph.tensors[t]
    while tt.view_of is not None:
        tt = graph.tensors[tt.view_of[0]]
    return tt.name


def placement_report(graph: Graph) -> list[dict[str, str]]:
    """One row per ONNX node: where it runs (NPU segment k / host / absorbed) and why."""
    rows = []
    for node in graph.nodes:
        where = f"npu:{node.segment}" if node.device == "npu" else "host"
        for src in node.sources or [node.name]:
            rows.append({"node": src, "op": node.onnx_op or node.op, "ir": node.op,
                         "where": where, "reason": node.reason})
    return rows
