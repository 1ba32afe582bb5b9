"""Lowering that fits model families: GNN aggregation with a constant adjacency.

A MatMul (or a Gemm) whose *left* operand is a constant matrix, ``Y = A @ X`` (the
neighbourhood aggregation of GCN/GIN layers), has no direct ISA form: the array's weights are
the constant operand and activations stream as rows, so the constant must be on the right. The
product is transposed, ``Y^T = X^T A^T``:

* legalize (:func:`const_left`) makes a ``conv`` node with the weight ``A`` (output channel
  ``n`` = node, input lane ``k`` = neighbour) and ``attrs['transpose_io']``;
* :func:`lower` (right after legalize) inserts a ``reorder`` turning ``X [K, F]`` into the
  row-major ``X^T [F, K]`` (DMA only) before the conv and one turning ``Y^T [F, N]`` back into
  ``Y [N, F]`` after it.

The zero point of ``X`` folds into a bias per output channel ``n`` (``-zx * sum_k A[n, k]``),
exactly as for any matmul. The conv tiler already skips weight tiles that are all zero, so
every all-zero array-sized block of ``A`` costs neither a PRELOAD nor a MATMUL: the aggregation
is a block-sparse matmul. :func:`sparse_blocks` counts the skipped blocks for the report.

A Gemm with a bias vector ``c`` (GCN: ``A_hat X + b``, fused by onnxruntime) adds ``c[f]`` along
the *rows* of ``Y^T``, which the per-channel VECTOR bias cannot express: ``attrs['row_bias']``
(int32 per output row, in accumulator units) is loaded into the ACC rows of each output tile
(LOAD to ACC from a DRAM constant) and every MATMUL accumulates onto it, so the sum is exact
and requantized once, like onnxruntime's Gemm. onnxruntime quantizes a Gemm's constant A as
an *activation* (zero point -128 for a non-negative adjacency, whose correction would depend
on the data per row); :mod:`npu.compiler.quantize` asks it for symmetric A instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from npu.compiler.ir import CHANNEL_LAST, ROWS, Graph, Node, Tensor

__all__ = ["is_const_left", "const_left", "lower", "sparse_blocks"]


def is_const_left(lz: Any, node: onnx.NodeProto) -> bool:
    """True when the node's first operand is a dequantized constant and the second is not."""
    m = lz.m
    a, b = node.input[0], node.input[1]
    pa, pb = m.producer.get(a), m.producer.get(b)
    return (pa is not None and pa.op_type == "DequantizeLinear" and pa.input[0] in m.consts
            and not (pb is not None and pb.op_type == "DequantizeLinear"
                     and pb.input[0] in m.consts))


def const_left(lz: Any, node: onnx.NodeProto, label: str) -> Node:
    """The transposed-product ``conv`` node of ``A @ X`` (A constant); see the module doc.

    ``lz`` is the legalizer (:class:`npu.compiler.passes.legalize._Legalizer`); raises its
    ``Unsupported`` for patterns this lowering cannot take exactly.
    """
    from npu.compiler.passes.legalize import Unsupported, _attrs, _dense_attrs, _int32

    a = _attrs(node)
    if node.op_type == "Gemm":
        if a.get("transB", 0) or float(a.get("alpha", 1.0)) != 1.0 or \
                float(a.get("beta", 1.0)) != 1.0:
            raise Unsupported("Gemm of a constant A with transB, alpha != 1 or beta != 1")
    x, xq = lz.m.act(node.input[1])
    w, ws, axis = lz.m.weight(node.input[0])
    if w.ndim != 2 or len(lz.m.shapes.get(node.input[1], ())) != 2:
        raise Unsupported("constant-left MatMul that is not 2-D")
    if a.get("transA", 0):
        w = w.T
        axis = 1 - axis if ws.size != 1 else axis
    if ws.size != 1 and axis % 2 != 0:
        # Scales per column k are per *input lane* of the transposed product: only exact when
        # every column re-expressed in the largest scale stays an integer (e.g. A + I with
        # 0/1 entries, where onnxruntime gives every column the same scale).
        scale = float(ws.max())
        ratio = w.astype(np.float64) * (ws.reshape(1, -1).astype(np.float64) / scale)
        if not np.allclose(ratio, np.round(ratio), rtol=0, atol=1e-3):
            raise Unsupported("constant A quantized per column with different scales")
        w, ws = np.round(ratio).astype(np.int8), np.array(scale, np.float32)
    attrs: dict[str, Any] = {**_dense_attrs(), "transpose_io": True}
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    if bias:
        # c[f] is added to row f of Y^T for every node n: a per-row bias, preloaded into the
        # ACC rows before the first MATMUL (see the module doc).
        if ws.size != 1:
            raise Unsupported("Gemm of a constant A quantized per channel plus a bias")
        f = lz.m.shapes[node.input[1]][1]
        if bias in lz.m.shapes and math.prod(lz.m.shapes[bias]) not in (1, f):
            raise Unsupported("Gemm of a constant A plus a bias that is not a vector over "
                              "the features")
        rb = lz.m.bias(bias, xq, ws.reshape(()), f)
        attrs["row_bias"] = _int32(rb, f"{label}: row bias")
    return lz._conv_like(node, label, x, xq, np.ascontiguousarray(w)[:, :, None, None], ws,
                         "", attrs)


def lower(graph: Graph) -> Graph:
    """Insert the reorders around every ``transpose_io`` conv (see the module doc)."""
    for node in list(graph.nodes):
        if node.device != "npu" or not node.attrs.pop("transpose_io", False):
            continue
        x, y = graph.tensors[node.inputs[0]], graph.tensors[node.outputs[0]]
        k, f = x.shape
        n = y.shape[0]
        xt = graph.fresh(f"{x.name}__T")
        graph.tensors[xt] = Tensor(xt, (f, k), "int8", x.quant, ROWS)
        yt = graph.fresh(f"{y.name}__T")
        graph.tensors[yt] = Tensor(yt, (f, n), "int8", y.quant, ROWS)
        idx = graph.nodes.index(node)
        common = {"onnx_op": "Transpose"}   # listed by name in the placement report
        graph.nodes.insert(idx, Node("reorder", graph.fresh(f"{node.name}/transpose_in"),
                                     [x.name], [xt], {"to": ROWS}, **common))
        graph.nodes.insert(idx + 2, Node("reorder", graph.fresh(f"{node.name}/transpose_out"),
                                         [yt], [y.name], {"to": CHANNEL_LAST}, **common))
        node.inputs, node.outputs = [xt], [yt]
        node.attrs["transposed"] = True
    return graph


def sparse_blocks(node: Node) -> tuple[int, int] | None:
    """(skipped, total) array-sized weight blocks of a tiled conv node, or None."""
    plan = node.plan
    seq = getattr(plan, "seq", None)
    if node.op != "conv" or not seq or not getattr(plan, "ktiles", None):
        return None
    total = plan.coc * len(plan.ktiles)
    run = sum(len(v) for v in seq.values())
    return total - run, total
