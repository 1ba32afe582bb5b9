"""Layout: NHWC on the NPU, with conversions only at segment borders.

Every int8 NPU tensor of rank 4 (and rank 3 around 1-D convolutions and pools) is stored
channel-last (:data:`npu.compiler.ir.CHANNEL_LAST`); all others row-major with the last axis as
channels (:data:`npu.compiler.ir.ROWS`; a gather's table and output and a generic concat's
operands see their row-major bytes as (rows, channels) at another axis, ``Tensor.split``). The
host works in ONNX order; the session transposes at the borders of every segment.

A ``reshape`` (Reshape/Flatten/Squeeze/Unsqueeze) becomes an alias of its input when the bytes
are already in the order its output needs (e.g. ``[N, C, 1, 1] -> [N, C]``). When they are not
(``Flatten`` of an NHWC feature map) and every consumer is a matmul with constant weights, the
weights' input axis is permuted to the NHWC order instead (the classic trick) and the reshape is
still an alias. Otherwise a ``reorder`` node (a DMA-only byte permutation between NHWC and
row-major order) is inserted on the channel-last side and the reshape aliases the row-major
copy.
"""

from __future__ import annotations

import numpy as np

from npu.compiler.ir import CHANNEL_LAST, ROWS, Graph, Node, Tensor

__all__ = ["layout", "dram_order"]

_SPATIAL = ("maxpool", "avgpool")


def _is_spatial(node: Node) -> bool:
    return node.op in _SPATIAL or (node.op == "conv" and node.attrs.get("kind") == "conv")


def dram_order(t: Tensor, layout: str) -> np.ndarray:
    """Logical (row-major ONNX) flat index of each element, in DRAM order."""
    idx = np.arange(t.size, dtype=np.int64).reshape(t.shape)
    if layout == CHANNEL_LAST and idx.ndim >= 3:
        idx = np.moveaxis(idx, 1, -1)
    return idx.reshape(-1)


def _rows_only(node: Node) -> bool:
    """Nodes whose tensors must be row-major (gathers, concats along a non-channel axis)."""
    return node.op == "gather" or (node.op == "concat" and node.attrs.get("generic", False)) \
        or (node.op == "copy" and "in_split" in node.attrs)


def layout(graph: Graph) -> Graph:
    """Assign tensor layouts and resolve reshapes (alias, weight permutation or reorder)."""
    consumers = graph.consumers()
    producer = graph.producer()
    for t in graph.tensors.values():
        if t.dtype != "int8" or t.is_const:
            continue
        users = consumers.get(t.name, [])
        prod = producer.get(t.name)
        near = [n for n in users + ([prod] if prod else []) if n.device == "npu"]
        spatial = any(_is_spatial(n) for n in near)
        if any(_rows_only(n) for n in near) and not spatial:
            t.layout = ROWS
        elif len(t.shape) == 4 or (len(t.shape) == 3 and spatial):
            t.layout = CHANNEL_LAST
        else:
            t.layout = ROWS
    # Row-major-only nodes cannot touch channel-last tensors: such a node runs on the host.
    for node in graph.nodes:
        if node.device == "npu" and _rows_only(node):
            names = [i for i in node.inputs + node.outputs if graph.tensors[i].dtype == "int8"]
            if any(graph.tensors[n].layout == CHANNEL_LAST for n in names):
                _to_host(node, "its tensors are stored NHWC (row-major needed)")
    for node in list(graph.nodes):
        if node.device != "npu" or node.op != "reshape":
            continue
        _reshape(graph, node, consumers)
    return graph


def _reshape(graph: Graph, node: Node, consumers: dict[str, list[Node]]) -> None:
    x, y = graph.tensors[node.inputs[0]], graph.tensors[node.outputs[0]]
    if x.view_of is not None:
        _to_host(node, "its input is written in place into a concat")
        return
    if x.size > 1 << 24:
        _to_host(node, "tensor too large to check the byte order")
        return
    din, dout = dram_order(x, x.layout), dram_order(y, y.layout)
    if np.array_equal(din, dout):
        y.alias_of = x.name
        return
    users = consumers.get(y.name, [])
    if y.layout == ROWS and len(y.shape) == 2 and users and all(
            u.device == "npu" and u.op == "conv" and u.attrs.get("kind") == "dense"
            and u.inputs == [y.name] for u in users) and y.name not in graph.outputs:
        k = y.shape[1]
        perm = din[:k]                      # logical input index at each DRAM position
        if all(np.array_equal(din[r * k:(r + 1) * k] - r * k, perm)
               for r in range(y.shape[0])):
            for u in users:
                w = u.attrs["weight"]        # [N, K, 1, 1]
                u.attrs["weight"] = np.ascontiguousarray(w[:, perm])
                u.attrs["permuted_input"] = True
            y.alias_of = x.name
            return
    # Reorder the channel-last side(s) through row-major copies, then alias.
    idx = graph.nodes.index(node)
    if x.layout == CHANNEL_LAST:
        xr = graph.fresh(f"{x.name}__rows")
        graph.tensors[xr] = Tensor(xr, x.shape, "int8", x.quant, ROWS)
        graph.nodes.insert(idx, Node("reorder", graph.fresh(f"{node.name}/to_rows"), [x.name],
                                     [xr], {"to": ROWS}, sources=list(node.sources),
                                     onnx_op=node.onnx_op))
        node.inputs = [xr]
        idx += 1
    if y.layout == CHANNEL_LAST:
        yr = graph.fresh(f"{y.name}__rows")
        graph.tensors[yr] = Tensor(yr, y.shape, "int8", y.quant, ROWS)
        node.outputs = [yr]
        graph.nodes.insert(idx + 1, Node("reorder", graph.fresh(f"{node.name}/to_nhwc"), [yr],
                                         [y.name], {"to": CHANNEL_LAST},
                                         sources=list(node.sources), onnx_op=node.onnx_op))
        graph.tensors[yr].alias_of = node.inputs[0]
    else:
        y.alias_of = node.inputs[0]


def _to_host(node: Node, reason: str) -> None:
    node.device = "host"
    node.reason = reason
