"""Lowering that fits model families: GNN aggregation with a constant adjacency.

A MatMul (or a Gemm) whose *left* operand is a constant matrix, ``Y = A @ X`` (the
neighbourhood aggregation of GCN/GIN layers), has no plain matmul form: the array's weights
are normally the constant operand and activations stream as rows. Legalize
(:func:`const_left`) makes a ``conv`` node with the weight ``A`` (output channel ``n`` = node,
input lane ``k`` = neighbour) and ``attrs['transpose_io']``; :func:`lower` (right after
legalize) then swaps the roles (``attrs['kind'] = 'agg'``, see :func:`_to_agg`,
:class:`npu.compiler.passes.tile.AggPlan`): a tile of ``X`` (channel-last, row = node ``k``,
lanes = features) is PRELOADed as the array's weights as it is, and the rows of ``A``
restricted to that k-block stream through it as the MATMUL inputs, accumulating in the ACC
rows of the output nodes; VECTOR writes ``Y`` channel-last, the layout the next layer reads.
Only the non-zero array-sized blocks of ``A`` are stored, loaded and multiplied: the
aggregation is a block-sparse matmul; :func:`sparse_blocks` counts the skipped blocks for the
report.

``A`` is quantized symmetric (zero point 0) and ``X`` has zero point ``zx``, so
``sum_k A[i,k] (x[k,f] - zx) = sum_k A[i,k] x[k,f] - zx r_i`` with ``r_i = sum_k A[i,k]``: a
term per output *row*, which VECTOR's per-lane bias cannot add. Each output tile's ACC rows
are first LOADed from a DRAM int32 constant ``C[i, f] = -zx r_i + c[f]`` (``c`` the bias of a
Gemm, GCN's ``A_hat X + b`` fused by onnxruntime; ``attrs['acc_rows']``, ``attrs['acc_cols']``)
and every MATMUL accumulates onto it, so the sum is exact and requantized once, like
onnxruntime's Gemm. onnxruntime quantizes a Gemm's constant A as an *activation* (zero point
-128 for a non-negative adjacency, whose correction would depend on the data);
:mod:`npu.compiler.quantize` asks it for symmetric A instead.

When the requantization differs between nodes (A quantized per row: a multiplier per output
row, which no per-lane parameter expresses), the product stays transposed,
``Y^T = X^T A^T``: :func:`lower` inserts a ``reorder`` turning ``X [K, F]`` into the row-major
``X^T [F, K]`` (DMA only) before the conv and one turning ``Y^T [F, N]`` back after it; the
conv tiler skips A's all-zero weight tiles, and a Gemm bias ``c[f]`` (along the rows of
``Y^T``: ``attrs['row_bias']``) is preloaded into the ACC rows of each output tile.
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
    """Turn every ``transpose_io`` conv into a direct aggregation (``kind`` ``agg``) when its
    requantization is the same for every node, else insert the reorders around it (see the
    module doc)."""
    for node in list(graph.nodes):
        if node.device != "npu" or not node.attrs.pop("transpose_io", False):
            continue
        if _to_agg(node, graph):
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


def _to_agg(node: Node, graph: Graph) -> bool:
    """Make ``node`` the direct product ``Y = A X`` (``attrs['kind'] = 'agg'``): ``adj`` the
    int8 ``A [N, K]``, ``acc_rows [N]`` and ``acc_cols [F]`` the int32 start of the
    accumulator ``C[i, f] = acc_rows[i] + acc_cols[f]`` (``-zx * sum_k A[i, k]`` and a Gemm
    bias), and per-lane (= per-feature) bias 0, multiplier and shift. False (nothing changed)
    when the requantization differs between nodes (A quantized per row)."""
    a = node.attrs
    f = graph.tensors[node.inputs[0]].shape[1]
    mult = np.asarray(a["mult"]).reshape(-1)
    shift = np.asarray(a["shift"]).reshape(-1)
    if np.any(mult != mult[0]) or np.any(shift != shift[0]):
        return False
    w = a.pop("weight")
    a["adj"] = np.ascontiguousarray(w[:, :, 0, 0], dtype=np.int8)
    a["acc_rows"] = np.asarray(a["bias"], np.int64).reshape(-1)
    rb = a.pop("row_bias", None)
    a["acc_cols"] = (np.zeros(f, np.int64) if rb is None
                     else np.broadcast_to(np.asarray(rb, np.int64).reshape(-1), (f,)).copy())
    a["bias"] = np.zeros(f, np.int32)
    a["mult"] = np.full(f, mult[0], dtype=np.asarray(a["mult"]).dtype)
    a["shift"] = np.full(f, shift[0], dtype=np.asarray(a["shift"]).dtype)
    a["kind"] = "agg"
    return True


def sparse_blocks(node: Node) -> tuple[int, int] | None:
    """(skipped, total) array-sized blocks of the constant of a tiled conv node, or None."""
    plan = node.plan
    if hasattr(plan, "skipped_blocks"):      # AggPlan: blocks of the adjacency
        return plan.skipped_blocks, plan.total_blocks
    seq = getattr(plan, "seq", None)
    if node.op != "conv" or not seq or not getattr(plan, "ktiles", None):
        return None
    total = plan.coc * len(plan.ktiles)
    run = sum(len(v) for v in seq.values())
    return total - run, total
