"""A numpy interpreter of the IR: what every NPU node means, independent of the programs.

It is the oracle the compiled programs are tested against (they must agree bit for bit on
every tensor), and, node by node with onnxruntime's own inputs, the check that the IR's integer
arithmetic is onnxruntime's QDQ arithmetic. Integer sums are computed with float64 matrix
products (exact: |sum| < 2**53 for any int8 layer this compiler takes) so a whole ResNet-50
runs in seconds.

NPU tensors are held channel-last ``(N, H, W, C)`` (:func:`npu.compiler.ir.geometry`); host
tensors in ONNX layout, as in the session.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from npu import numerics
from npu.compiler.errors import CompileError
from npu.compiler.ir import CHANNEL_LAST, Graph, Node, Step, Tensor, geometry
from npu.compiler.qmath import pool_scale, requant_params

__all__ = ["run_graph", "eval_node", "to_nhwc", "from_nhwc"]


def to_nhwc(value: np.ndarray, t: Tensor) -> np.ndarray:
    """ONNX-layout int8 tensor -> (N, H, W, C) (its DRAM order)."""
    arr = np.asarray(value)
    if t.layout == CHANNEL_LAST and arr.ndim >= 3:
        arr = np.moveaxis(arr, 1, -1)
    return arr.reshape(geometry(t))


def from_nhwc(value: np.ndarray, t: Tensor) -> np.ndarray:
    """(N, H, W, C) -> ONNX layout."""
    n, h, w, c = geometry(t)
    arr = np.asarray(value).reshape(n, h, w, c)
    if t.layout == CHANNEL_LAST and len(t.shape) >= 3:
        arr = np.moveaxis(arr.reshape((n, w, c) if len(t.shape) == 3 else (n, h, w, c)), -1, 1)
    return arr.reshape(t.shape)


def _steps(y: np.ndarray, steps: list[Step], env: Mapping[str, np.ndarray]) -> np.ndarray:
    for st in steps:
        b = env[st.other].astype(np.int64) if st.other is not None else y
        y = numerics.eltwise_add(y, b, st.a_zero, st.b_zero, st.a_mult, st.b_mult, st.shift,
                                 st.zero_point, st.clamp_min, st.clamp_max).astype(np.int64)
    return y


def _windows(x: np.ndarray, a: dict[str, Any], fill: int, oh: int, ow: int):
    """Yield (ky, kx, patch [N, oh, ow, C]) of a padded input."""
    pt, pl, pb, pr = a["pads"]
    kh, kw = a["kernel"]
    sy, sx = a["strides"]
    dy, dx = a["dilations"]
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dy, kx * dx
            yield ky, kx, xp[:, y0:y0 + sy * (oh - 1) + 1:sy, x0:x0 + sx * (ow - 1) + 1:sx, :]


def _conv(node: Node, graph: Graph, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    a = node.attrs
    acc = _conv_acc(node, graph, x, out_shape)
    lo, hi = a.get("clamp", (-128, 127))
    return numerics.requantize(acc, a["bias"], a["mult"], a["shift"], a["zero_point"], lo,
                               hi, fp32=int(a.get("fp32", 0))).astype(np.int64)


def _conv_acc(node: Node, graph: Graph, x: np.ndarray, out_shape: tuple[int, ...]
              ) -> np.ndarray:
    """The exact integer sums of a conv node (before bias and requantization)."""
    a = node.attrs
    if a.get("kind") == "agg":   # Y = A X + C (families: constant adjacency, direct form)
        xf = x.astype(np.float64).reshape(-1, x.shape[-1])
        acc = np.rint(a["adj"].astype(np.float64) @ xf).astype(np.int64)
        acc += np.asarray(a["acc_rows"], np.int64).reshape(-1, 1)
        acc += np.asarray(a["acc_cols"], np.int64).reshape(1, -1)
        return acc.reshape(out_shape)
    _, oh, ow, cout = out_shape
    zx = graph.tensors[node.inputs[0]].quant.zero_point
    w = a["weight"].astype(np.float64)            # [Cout, Cin/g, KH, KW]
    g = int(a.get("group", 1))
    cig, cog = w.shape[1], cout // g
    acc = np.zeros((x.shape[0], oh, ow, cout), dtype=np.float64)
    xf = x.astype(np.float64)
    for ky, kx, patch in _windows(xf, a, zx, oh, ow):
        for gi in range(g):
            acc[..., gi * cog:(gi + 1) * cog] += \
                patch[..., gi * cig:(gi + 1) * cig] @ w[gi * cog:(gi + 1) * cog, :, ky, kx].T
    out = np.rint(acc).astype(np.int64)
    if a.get("row_bias") is not None:   # per output pixel (families: constant-left Gemm)
        out += np.asarray(a["row_bias"], np.int64).reshape(1, oh, ow, 1)
    return out


def _multi_conv(node: Node, graph: Graph, env: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """A conv node with several inputs (split-K: their channels concatenated) and/or several
    outputs (fused siblings: column slices, each with its own requantization and steps)."""
    from npu.compiler.passes.mlp import out_parts

    x = np.concatenate([env[i] for i in node.inputs], axis=-1)
    a = node.attrs
    n, h, w, _ = geometry(graph.tensors[node.outputs[0]])
    cout = int(a["weight"].shape[0])
    acc = _conv_acc(node, graph, x, (n, h, w, cout))
    out: dict[str, np.ndarray] = {}
    for o, part in zip(node.outputs, out_parts(node)):
        sl = slice(part["offset"], part["offset"] + part["channels"])
        lo, hi = part["clamp"]
        bias = np.broadcast_to(np.asarray(a["bias"]).reshape(-1), (cout,))[sl]
        mult = np.broadcast_to(np.asarray(a["mult"]).reshape(-1), (cout,))[sl]
        shift = np.broadcast_to(np.asarray(a["shift"]).reshape(-1), (cout,))[sl]
        y = numerics.requantize(acc[..., sl], bias, mult, shift, part["zero_point"], lo,
                                hi, fp32=int(a.get("fp32", 0))).astype(np.int64)
        shape = geometry(graph.tensors[o])
        out[o] = _steps(y, part["epilogue"], env).reshape(shape)
    return out


def _avgpool(node: Node, graph: Graph, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    from npu.compiler.passes.schedule import avg_divisors

    a = node.attrs
    _, oh, ow, c = out_shape
    xq = graph.tensors[node.inputs[0]].quant
    yq = graph.tensors[node.outputs[0]].quant
    # The pool's own output quantization (fuse may have redirected it to a concat's tensor).
    yq = dataclasses.replace(yq, scale=a.get("out_scale", yq.scale),
                             zero_point=a.get("zero_point", yq.zero_point))
    acc = np.zeros((x.shape[0], oh, ow, c), dtype=np.int64)
    for _, _, patch in _windows(x.astype(np.int64), a, xq.zero_point, oh, ow):
        acc += patch
    kh, kw = a["kernel"]
    acc -= kh * kw * xq.zero_point

    class _P:  # the fields avg_divisors reads
        pass

    p = _P()
    n, h, w, _ = x.shape
    p.oh, p.ow, p.h, p.w, p.kh, p.kw = oh, ow, h, w, kh, kw
    p.sy, p.sx = a["strides"]
    p.dy, p.dx = a["dilations"]
    p.pads = a["pads"]
    divs = avg_divisors(p, a.get("count_include_pad", 0))   # type: ignore[arg-type]
    out = np.zeros_like(acc)
    lo, hi = a.get("clamp", (-128, 127))
    for d in np.unique(divs):   # onnxruntime's float32 requantization (VECTOR fp32 mode)
        mult, shift = requant_params(np.array([pool_scale(xq.scale, yq.scale, d)]), node.name)
        sel = divs == d
        out[:, sel] = numerics.requantize(acc[:, sel], 0, mult[0], shift[0], yq.zero_point, lo,
                                          hi, fp32=1)
    return out


def _maxpool(node: Node, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    _, oh, ow, c = out_shape
    out = np.full((x.shape[0], oh, ow, c), numerics.INT8_MIN, dtype=np.int64)
    for _, _, patch in _windows(x.astype(np.int64), node.attrs, numerics.INT8_MIN, oh, ow):
        out = np.maximum(out, patch)
    return out


def eval_node(graph: Graph, node: Node, env: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of one NPU node from channel-last int inputs in ``env`` (int64 arrays)."""
    out_t = graph.tensors[node.outputs[0]]
    shape = geometry(out_t)
    steps = node.attrs.get("epilogue", [])
    if node.op == "conv" and (len(node.inputs) > 1 or len(node.outputs) > 1):
        return _multi_conv(node, graph, env)
    if node.op == "conv":
        y = _conv(node, graph, env[node.inputs[0]], shape)
    elif node.op == "avgpool":
        y = _avgpool(node, graph, env[node.inputs[0]], shape)
    elif node.op == "maxpool":
        y = _maxpool(node, env[node.inputs[0]], shape)
    elif node.op in ("add", "clamp", "copy"):
        y = env[node.inputs[0]].astype(np.int64).reshape(shape)
    elif node.op == "reshape":
        return {node.outputs[0]: env[node.inputs[0]].reshape(shape)}
    elif node.op == "reorder":       # same values, another byte order
        t_in = graph.tensors[node.inputs[0]]
        return {node.outputs[0]: to_nhwc(from_nhwc(env[node.inputs[0]], t_in), out_t)}
    elif node.op == "concat":
        if node.attrs.get("generic", False):
            parts = [from_nhwc(env[i], graph.tensors[i]) for i in node.inputs]
            full = np.concatenate(parts, axis=node.attrs["axis"])
            return {node.outputs[0]: to_nhwc(full, out_t)}
        return {node.outputs[0]: np.concatenate([env[i] for i in node.inputs], axis=-1)}
    elif node.op == "gather":
        t = graph.tensors[node.inputs[0]]
        table = (np.asarray(t.data) if t.is_const else from_nhwc(env[t.name], t))
        table = table.astype(np.int64).reshape(t.shape[0], -1)
        idx = np.asarray(env[node.inputs[1]]).astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + table.shape[0], idx)
        return {node.outputs[0]: table[idx].reshape(shape)}
    else:
        raise CompileError(f"no reference for IR op {node.op}", node.name, node.onnx_op)
    return {node.outputs[0]: _steps(y, steps, env).reshape(shape)}


def run_graph(graph: Graph, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every tensor of the model for ``feeds``, in ONNX layout (like ``session.tensors``)."""
    from npu.compiler.session import _HostOp

    env: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items()}
    for t in graph.tensors.values():
        if t.is_const:
            env[t.name] = np.asarray(t.data)
    for node in graph.nodes:
        if node.device == "host":
            env.update(_HostOp(node, graph)(env))
        else:
            env.update(eval_onnx_layout(graph, node, env))
    return env


def eval_onnx_layout(graph: Graph, node: Node, env: Mapping[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
    """:func:`eval_node` on ONNX-layout tensors (also how the host runs an IR node)."""
    if node.op == "reshape":
        return {node.outputs[0]: np.reshape(env[node.inputs[0]],
                                            graph.tensors[node.outputs[0]].shape)}
    nhwc: dict[str, np.ndarray] = {}
    names = node.inputs + [s.other for s in node.attrs.get("epilogue", []) if s.other]
    for name in names:
        t = graph.tensors[name]
        if t.is_const:
            continue
        if node.op == "gather" and name == node.inputs[1]:
            nhwc[name] = np.asarray(env[name]).astype(np.int64)
        else:
            split = node.attrs.get("in_split") if name == node.inputs[0] else None
            tt = t if split is None else _with_split(t, split)
            nhwc[name] = to_nhwc(env[name], tt).astype(np.int64)
    out = {}
    for name, value in eval_node(graph, node, nhwc).items():
        out[name] = from_nhwc(value, graph.tensors[name]).astype(np.int8)
    return out


def _with_split(t: Tensor, split: int) -> Tensor:
    import dataclasses

    return dataclasses.replace(t, split=split)
