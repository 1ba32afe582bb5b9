"""Lowering that fits MLPs (NeRF): split-K concatenation and fused sibling matmuls.

**Split-K concatenation** (:func:`split_k`, right after legalize). ``Y = concat(x_0, x_1, ..)``
along the channel axis whose only readers are matmuls (Gemm/MatMul, 1x1 convolutions) is never
materialized: each reader becomes one ``conv`` node with the inputs ``x_0, x_1, ..`` and
``attrs['k_parts']`` (their channel counts). Its weight rows ``W = [W_0; W_1; ..]`` are split
per input, each part starting on a fresh K chunk of the array (zero lanes up to the chunk
edge), and the MATMULs of every part accumulate into the same ACC rows of the output tile:
``y = sum_i x_i W_i`` (NeRF's skip connection: layer 5 reads the encoded input and the hidden
state). onnxruntime's QDQ Concat re-quantizes every input to the concat's output scale
(``Q_y(DQ_i(x_i))``) before the matmul dequantizes it, so an input whose quantization differs
still gets that exact rescale: a ``clamp`` node (ELTWISE rescale), which ``fuse`` folds into
the input's producer when it has one on the NPU (its epilogue then writes the rescaled tensor)
and which otherwise runs as a copy of that (narrow) input alone. Inputs already in the
concat's quantization are read where they are. All inputs then share the concat's zero point,
which legalize already folded into the bias.

**Fused siblings** (:func:`fuse_siblings`, after layout, knows the array). Matmuls reading the
same input (NeRF's 1-wide density head and 256-wide feature layer both read the last hidden
state) become one ``conv`` node whose weight columns are the siblings' output channels, each
sibling starting on a fresh chunk of ``cols`` output lanes; ``attrs['out_parts']`` holds, per
output tensor, its channel offset and count and its own requantization tail (zero point,
clamp, epilogue steps). VECTOR takes bias, multiplier and shift per lane and zero point and
clamp per instruction, so every chunk is requantized and stored with its own sibling's
parameters: exact for any mix of output quantizations. The input block is loaded once per
tile for all siblings, and one layer boundary (pipeline drain and fill) disappears.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from npu.compiler.ir import Graph, Node, Tensor
from npu.compiler.qmath import is_identity

__all__ = ["split_k", "fuse_siblings", "split_k_weight", "out_parts", "describe"]


# --------------------------------------------------------------------------------------------
# Split-K concatenation
# --------------------------------------------------------------------------------------------

def _is_rows_matmul(node: Node) -> bool:
    """A conv node the tiler runs in ``rows`` mode (1x1 kernel, no padding, no groups)."""
    a = node.attrs
    return (node.device == "npu" and node.op == "conv" and tuple(a.get("kernel", ())) == (1, 1)
            and tuple(a.get("pads", ())) == (0, 0, 0, 0) and int(a.get("group", 1)) == 1
            and not a.get("transpose_io") and a.get("kind") != "agg" and "k_parts" not in a)


def split_k(graph: Graph) -> Graph:
    """Replace channel concats read only by matmuls with split-K matmuls (see module doc)."""
    consumers = graph.consumers()
    for node in list(graph.nodes):
        if node.device != "npu" or node.op != "concat" or node.attrs.get("generic", False):
            continue
        y = node.outputs[0]
        yt = graph.tensors[y]
        users = consumers.get(y, [])
        if not users or y in graph.outputs or not all(
                _is_rows_matmul(u) and u.inputs == [y] for u in users):
            continue
        if len(yt.shape) not in (2, 4) or len(set(node.inputs)) != len(node.inputs):
            continue
        parts: list[str] = []
        for t, step in zip(node.inputs, node.attrs["rescale"]):
            tt = graph.tensors[t]
            if is_identity(step) and tt.quant == yt.quant:
                parts.append(t)
                continue
            # onnxruntime requantizes this input to the concat's scale: one ELTWISE rescale.
            v = graph.fresh(f"{t}__as_{y}")
            graph.tensors[v] = Tensor(v, tt.shape, "int8", yt.quant)
            rescale = Node("clamp", graph.fresh(f"{node.name}/rescale{len(parts)}"), [t], [v],
                           {"epilogue": [dataclasses.replace(step)]},
                           sources=list(node.sources), onnx_op="Concat")
            _place_rescale(graph, rescale, node)
            parts.append(v)
        axis = node.attrs["axis"]
        counts = [int(graph.tensors[t].shape[axis]) for t in node.inputs]
        offsets = np.cumsum([0] + counts[:-1]).tolist()
        for u in users:
            u.inputs = list(parts)
            u.attrs["k_parts"] = counts
            # Where each part's values are in the QDQ model (the concat's output, axis 1).
            u.attrs["k_sources"] = [(y, int(o)) for o in offsets]
            u.sources = list(dict.fromkeys(node.sources + u.sources))
            u.onnx_op = f"Concat+{u.onnx_op}"
        graph.nodes.remove(node)
        graph.tensors.pop(y, None)
        graph.notes.append(f"split-K: {node.name} ({' + '.join(map(str, counts))} channels) "
                           f"read by {', '.join(u.name for u in users)} without a copy")
    return graph


def _place_rescale(graph: Graph, rescale: Node, concat: Node) -> None:
    """Insert ``rescale`` before ``concat`` or, when its input is ready earlier, right before
    the first matmul after that point (without a rider yet): ``attrs['ride_with']`` names
    it, and emit interleaves the rescale's (small) tiles with that matmul's items, on the
    vector unit and DMA beside the busy array (``allocate`` keeps the rescale's input alive
    through the matmul). The NeRF encoding's rescale would otherwise run alone between two
    layers while the array waits."""
    src = rescale.inputs[0]
    end = graph.nodes.index(concat)
    start = next((i + 1 for i, n in enumerate(graph.nodes) if src in n.outputs), 0)
    taken = {n.attrs.get("ride_with") for n in graph.nodes}
    for i in range(start, end):
        n = graph.nodes[i]
        if n.device == "npu" and n.op == "conv" and n.name not in taken:
            rescale.attrs["ride_with"] = n.name
            graph.nodes.insert(i, rescale)
            return
    graph.nodes.insert(end, rescale)


def split_k_weight(node: Node, rows: int) -> np.ndarray:
    """``[Cout, K', 1, 1]`` weights of a split-K node: part ``i`` starts at lane ``rows * j_i``
    (the first K chunk of its own), zero lanes up to each part's chunk edge."""
    w = node.attrs["weight"]
    counts = node.attrs["k_parts"]
    if sum(counts) != w.shape[1] or w.shape[2:] != (1, 1):
        raise ValueError(f"{node.name}: k_parts {counts} do not match weights {w.shape}")
    chunks = [-(-c // rows) for c in counts]
    out = np.zeros((w.shape[0], sum(chunks) * rows, 1, 1), dtype=w.dtype)
    src = dst = 0
    for c, j in zip(counts, chunks):
        out[:, dst:dst + c] = w[:, src:src + c]
        src += c
        dst += j * rows
    return out


# --------------------------------------------------------------------------------------------
# Fused sibling matmuls
# --------------------------------------------------------------------------------------------

def out_parts(node: Node) -> list[dict[str, Any]]:
    """Per output tensor of a conv node: ``offset``/``channels`` (lanes of the weight's output
    axis), ``zero_point``, ``clamp``, ``epilogue``. One part for an ordinary node."""
    parts = node.attrs.get("out_parts")
    if parts is not None:
        return parts
    return [{"offset": 0, "channels": int(node.attrs["weight"].shape[0]),
             "zero_point": node.attrs["zero_point"],
             "clamp": node.attrs.get("clamp", (-128, 127)),
             "epilogue": node.attrs.get("epilogue", [])}]


def _fusable(node: Node, graph: Graph) -> bool:
    a = node.attrs
    return (node.device == "npu" and node.op == "conv" and a.get("kind") == "dense"
            and _is_rows_matmul(node) and len(node.inputs) == 1 and len(node.outputs) == 1
            and "out_parts" not in a and tuple(a.get("strides", (1, 1))) == (1, 1)
            and not a.get("permuted_input")
            and a.get("row_bias") is None    # per-row bias (families): one per sibling
            and all(st.other is None for st in a.get("epilogue", [])))


def fuse_siblings(graph: Graph, cols: int) -> Graph:
    """Merge matmuls that read the same input into one node (see module doc); ``cols`` is the
    array's output width: each sibling starts on a chunk boundary."""
    groups: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if _fusable(node, graph):
            groups.setdefault(node.inputs[0], []).append(node)
    for x, sibs in groups.items():
        if len(sibs) < 2:
            continue
        first = sibs[0]
        order = {n.name: i for i, n in enumerate(graph.nodes)}
        # All siblings run where the first one is: nothing between may read their outputs.
        lo, hi = order[first.name], max(order[n.name] for n in sibs)
        between = {o for n in graph.nodes[lo:hi + 1] if n not in sibs for o in n.inputs}
        sibs = [first] + [n for n in sibs[1:] if not set(n.outputs) & between]
        if len(sibs) < 2:
            continue
        weights, bias, mult, shift, parts = [], [], [], [], []
        off = 0
        for n in sibs:
            a = n.attrs
            c = int(a["weight"].shape[0])
            pad = -(-c // cols) * cols - c
            weights.append(a["weight"])
            weights.append(np.zeros((pad,) + a["weight"].shape[1:], a["weight"].dtype))
            for lst, key in ((bias, "bias"), (mult, "mult"), (shift, "shift")):
                v = np.asarray(a[key], dtype=np.int64).reshape(-1)
                lst.append(np.broadcast_to(v, (c,)))
                lst.append(np.zeros(pad, np.int64))
            parts.append({"offset": off, "channels": c, "zero_point": a["zero_point"],
                          "clamp": tuple(a.get("clamp", (-128, 127))),
                          "epilogue": list(a.get("epilogue", []))})
            off += c + pad
        a = first.attrs
        a["weight"] = np.concatenate(weights, axis=0)
        a["bias"] = np.concatenate(bias)
        a["mult"] = np.concatenate(mult)
        a["shift"] = np.concatenate(shift)
        a["out_parts"] = parts
        a["epilogue"] = []
        first.outputs = [o for n in sibs for o in n.outputs]
        first.sources = [s for n in sibs for s in n.sources]
        first.onnx_op = "+".join(dict.fromkeys(n.onnx_op for n in sibs))
        for n in sibs[1:]:
            graph.nodes.remove(n)
        graph.notes.append(f"fused siblings: {', '.join(n.name for n in sibs)} read {x} as one "
                           f"matmul of {off} output lanes")
    return graph


def describe(node: Node) -> str:
    """The report's note on these lowerings of ``node`` ("" when none applies)."""
    notes = []
    if "k_parts" in node.attrs:
        notes.append("split-K over " + " + ".join(
            f"{t} ({c})" for t, c in zip(node.inputs, node.attrs["k_parts"])) + ", no concat")
    if "out_parts" in node.attrs:
        notes.append("fused outputs " + " + ".join(
            f"{t} ({p['channels']})" for t, p in zip(node.outputs, node.attrs["out_parts"])))
    return "; ".join(notes)
