"""Legalize: a QDQ ONNX model -> the IR.

Every compute node whose activation inputs come from DequantizeLinear of int8 tensors and whose
output goes only to one QuantizeLinear becomes an int8 NPU node (``conv``, ``add``, ``clamp``,
``maxpool``, ``avgpool``, ``concat``, ``reshape``, ``gather``) reading the int8 tensors and
writing the Q node's output; its Q/DQ nodes are absorbed. Weights are read from the
DequantizeLinear of their int8 initializers, biases from the int32 ones; requantization uses
onnxruntime's float32 scales (VECTOR fp32 mode) and ELTWISE steps chosen to reproduce its
kernels (:mod:`npu.compiler.qmath`); the input zero point is folded into the bias
(``bias - zx * sum(w)``), so padding must read as ``zx``.

Everything else (Softmax, LRN, float ops, Q/DQ at the borders, patterns the NPU cannot do)
becomes a ``host`` node carrying its ONNX node; ``Node.reason`` says why.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from npu.compiler.errors import CompileError
from npu.compiler.frontend import graph_inputs, node_label, value_shapes
from npu.compiler.ir import Graph, Node, Quant, Tensor
from npu.compiler.passes import families
from npu.compiler.qmath import (
    add_step,
    quantize_scalar,
    requant_params,
    requant_scales,
    rescale_step,
)

__all__ = ["legalize", "Unsupported"]

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT8: "int8",
           onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT32: "int32",
           onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float16",
           onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.BOOL: "bool"}


@dataclass
class _Out:
    """Where a compute node's result goes: the int8 tensor, its quantization, the Q node, an
    absorbed Relu/Clip and the clamp bounds it implies."""

    name: str
    quant: Quant
    q: onnx.NodeProto
    act: onnx.NodeProto | None
    lo: int
    hi: int


class Unsupported(Exception):
    """A pattern the NPU cannot take; the node then runs on the host with this reason."""


def _key(node: onnx.NodeProto) -> str:
    """A stable identity for an ONNX node: its first output (outputs are unique)."""
    return node.output[0] if node.output else f"<{node.op_type}:{node.name}>"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Model:
    """Lookup tables over the ONNX graph used by the pattern handlers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.graph = g
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.index = {_key(n): i for i, n in enumerate(g.node)}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.shapes = value_shapes(model)
        self.dtypes: dict[str, str] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type"):
                self.dtypes[vi.name] = _DTYPES.get(vi.type.tensor_type.elem_type, "other")
        for t in g.initializer:
            self.dtypes[t.name] = _DTYPES.get(t.data_type, "other")

    def const(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise Unsupported(f"{name!r} is not a constant")
        return self.consts[name]

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, int]:
        """(scale, zero_point, axis) of a Q/DQ node; all constant."""
        scale = self.const(node.input[1]).astype(np.float32)
        if len(node.input) > 2 and node.input[2]:
            zp = self.const(node.input[2])
        else:
            zp = np.zeros_like(scale, dtype=np.uint8)
        axis = int(_attrs(node).get("axis", 1))
        if _attrs(node).get("block_size", 0):
            raise Unsupported("blocked quantization")
        return scale, zp, axis

    def act(self, name: str) -> tuple[str, Quant]:
        """The int8 tensor and quantization behind a DequantizeLinear activation input."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            raise Unsupported(f"input {name!r} is not dequantized int8 data")
        src = dq.input[0]
        if src in self.consts:
            raise Unsupported(f"input {name!r} is a constant, not an activation")
        scale, zp, _ = self.qparams(dq)
        if scale.size != 1 or zp.size != 1:
            raise Unsupported(f"input {name!r} is quantized per channel")
        if zp.dtype != np.int8:
            raise Unsupported(f"input {name!r} is {zp.dtype} (the NPU takes int8 activations)")
        return src, Quant(float(scale.reshape(())), int(zp.reshape(())))

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(int8 weights, per-channel or scalar scale, axis) from a DequantizeLinear."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in self.consts:
            raise Unsupported(f"weight {name!r} is not a dequantized int8 constant")
        w = self.consts[dq.input[0]]
        if w.dtype != np.int8:
            raise Unsupported(f"weight {name!r} is {w.dtype}, the NPU takes int8 weights")
        scale, zp, axis = self.qparams(dq)
        if np.any(zp != 0):
            raise Unsupported(f"weight {name!r} has a non-zero zero point (asymmetric weights)")
        return w, scale, axis

    def out(self, node: onnx.NodeProto, allow_act: bool = True) -> _Out:
        """The QuantizeLinear that is the only consumer of the node's output, possibly through
        a Relu/Clip whose float input is not quantized (then folded in as a clamp: Q is
        monotone, so ``Q(relu(v)) = max(Q(v), Q(0))``)."""
        y = node.output[0]
        users = self.consumers.get(y, [])
        act = None
        if allow_act and y not in self.outputs and len(users) == 1 and \
                users[0].op_type in ("Relu", "Clip"):
            act = users[0]
            y = act.output[0]
            users = self.consumers.get(y, [])
        if y in self.outputs or len(users) != 1 or users[0].op_type != "QuantizeLinear":
            raise Unsupported("its output is not quantized by exactly one QuantizeLinear")
        q = users[0]
        scale, zp, _ = self.qparams(q)
        if scale.size != 1 or zp.size != 1 or zp.dtype != np.int8:
            raise Unsupported("its output quantization is not per-tensor int8")
        yq = Quant(float(scale.reshape(())), int(zp.reshape(())))
        lo, hi = -128, 127
        if act is not None:
            lo, hi = self.act_bounds(act, yq)
        return _Out(q.output[0], yq, q, act, lo, hi)

    def act_bounds(self, act: onnx.NodeProto, yq: Quant) -> tuple[int, int]:
        """Quantized clamp bounds of a Relu/Clip with output quantization ``yq``."""
        if act.op_type == "Relu":
            return quantize_scalar(0.0, yq), 127
        a = _attrs(act)
        cmin, cmax = a.get("min"), a.get("max")
        if len(act.input) > 1 and act.input[1]:
            cmin = float(self.const(act.input[1]))
        if len(act.input) > 2 and act.input[2]:
            cmax = float(self.const(act.input[2]))
        lo = quantize_scalar(cmin, yq) if cmin is not None else -128
        hi = quantize_scalar(cmax, yq) if cmax is not None else 127
        return lo, hi

    def bias(self, name: str, x: Quant, w_scale: np.ndarray, cout: int) -> np.ndarray:
        """int32 bias in units of x_scale * w_scale (quantized here if it is float)."""
        if not name:
            return np.zeros(cout, dtype=np.int64)
        dq = self.producer.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in self.consts:
            b = self.consts[dq.input[0]].astype(np.int64).reshape(-1)
            scale, zp, _ = self.qparams(dq)
            if np.any(zp != 0):
                raise Unsupported("bias has a non-zero zero point")
            want = np.float32(x.scale) * np.broadcast_to(w_scale, (cout,)).astype(np.float32)
            got = np.broadcast_to(scale.reshape(-1), (cout,))
            if not np.allclose(got, want, rtol=1e-4, atol=0):
                # Requantize into the accumulator's scale.
                real = b * got.astype(np.float64)
                b = np.round(real / want.astype(np.float64)).astype(np.int64)
        elif name in self.consts:
            real = self.consts[name].astype(np.float64).reshape(-1)
            want = np.float32(x.scale) * np.broadcast_to(w_scale, (cout,)).astype(np.float32)
            b = np.round(real / want.astype(np.float64)).astype(np.int64)
        else:
            raise Unsupported(f"bias {name!r} is not constant")
        return np.broadcast_to(b, (cout,)).copy()


def _int32(values: np.ndarray, what: str) -> np.ndarray:
    if values.size and (values.min() < -(1 << 31) or values.max() >= 1 << 31):
        raise Unsupported(f"{what} does not fit int32")
    return values.astype(np.int64)


def _pads(attrs: dict[str, Any], in_hw: tuple[int, ...], kernel: tuple[int, ...],
          strides: tuple[int, ...], dil: tuple[int, ...], ceil_mode: bool = False
          ) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) explicit padding, auto_pad and ceil_mode resolved."""
    nd = len(kernel)
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(nd):
            out = math.ceil(in_hw[i] / strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - in_hw[i])
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        pads_b, pads_e = [0] * nd, [0] * nd
    else:
        p = list(attrs.get("pads", [0] * (2 * nd)))
        pads_b, pads_e = p[:nd], p[nd:]
    if ceil_mode:
        for i in range(nd):
            span = in_hw[i] + pads_b[i] + pads_e[i] - ((kernel[i] - 1) * dil[i] + 1)
            out = -(-span // strides[i]) + 1
            # The last window must start inside the input or left padding (ONNX rule).
            if (out - 1) * strides[i] >= in_hw[i] + pads_b[i]:
                out -= 1
            need = (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
            pads_e[i] = max(pads_e[i], need - in_hw[i] - pads_b[i])
    if nd == 1:
        return 0, pads_b[0], 0, pads_e[0]
    return pads_b[0], pads_b[1], pads_e[0], pads_e[1]


def _spatial(node: onnx.NodeProto, attrs: dict[str, Any], shape: tuple[int, ...],
             kernel: tuple[int, ...] | None = None, ceil: bool = False) -> dict[str, Any]:
    """kernel, strides, dilations, pads of a 1-D/2-D sliding window op on an NC(H)W input."""
    nd = len(shape) - 2
    if nd not in (1, 2):
        raise Unsupported(f"{nd}-D spatial windows (the NPU takes 1-D and 2-D)")
    k = tuple(kernel if kernel is not None else attrs["kernel_shape"])
    s = tuple(attrs.get("strides", [1] * nd))
    d = tuple(attrs.get("dilations", [1] * nd))
    pads = _pads(attrs, shape[2:], k, s, d, ceil)
    if nd == 1:
        k, s, d = (1, k[0]), (1, s[0]), (1, d[0])
    return {"kernel": k, "strides": s, "dilations": d, "pads": pads}


class _Legalizer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.m = _Model(model)
        self.model = model
        self.graph = Graph(model.graph.name or "model", {}, [], [], [],
                           opset=[(o.domain, o.version) for o in model.opset_import])
        # Keys (_key) of ONNX nodes replaced by NPU nodes (protobuf wrappers have no stable id).
        self.absorbed: set[str] = set()
        self.handlers: dict[str, Callable[[onnx.NodeProto, str], Node]] = {
            "Conv": self.conv, "Gemm": self.gemm, "MatMul": self.matmul, "Add": self.add,
            "Sum": self.add, "Relu": self.clamp, "Clip": self.clamp, "MaxPool": self.maxpool,
            "GlobalMaxPool": self.maxpool, "AveragePool": self.avgpool,
            "GlobalAveragePool": self.avgpool, "Concat": self.concat, "Reshape": self.reshape,
            "Flatten": self.reshape, "Squeeze": self.reshape, "Unsqueeze": self.reshape,
            "Gather": self.gather,
        }

    # Tensors ---------------------------------------------------------------------------------
    def tensor(self, name: str, quant: Quant | None = None) -> Tensor:
        t = self.graph.tensors.get(name)
        if t is None:
            shape = self.m.shapes.get(name)
            if shape is None:
                raise CompileError(f"tensor {name!r} has no static shape")
            data = self.m.consts.get(name)
            t = Tensor(name, tuple(shape), self.m.dtypes.get(name, "float32"), quant,
                       data=data)
            self.graph.tensors[name] = t
        if quant is not None:
            t.quant = quant
        return t

    # Driver ----------------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.model.graph
        for inp in graph_inputs(g):
            self.tensor(inp.name)
            self.graph.inputs.append(inp.name)
        placed: list[tuple[int, Node | None, onnx.NodeProto]] = []
        for idx, node in enumerate(g.node):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") or \
                    _key(node) in self.absorbed:   # (a Relu/Clip folded into its producer)
                placed.append((idx, None, node))
                continue
            label = node_label(node, idx)
            handler = self.handlers.get(node.op_type) if node.domain in ("", "ai.onnx") \
                else None
            npu: Node | None = None
            reason = "" if handler else f"the NPU has no {node.op_type} operation"
            self.extra_sources: list[tuple[str, str]] = []
            if handler is not None:
                try:
                    npu = handler(node, label)
                except Unsupported as exc:
                    reason = str(exc)
            if npu is not None:
                npu.onnx_op = node.op_type + "".join(f"+{op}" for _, op in self.extra_sources)
                npu.sources = [label] + [lab for lab, _ in self.extra_sources]
                placed.append((idx, npu, node))
                self.absorbed.add(_key(node))
            else:
                placed.append((idx, self.host(node, label, reason), node))
        # Q nodes feeding only absorbed ops' outputs were absorbed by their handler; DQ nodes
        # are absorbed when every consumer of theirs was.
        for idx, npu, node in placed:
            if npu is not None:
                self.graph.nodes.append(npu)
                continue
            if _key(node) in self.absorbed:
                continue
            if node.op_type == "DequantizeLinear":
                users = self.m.consumers.get(node.output[0], [])
                if users and node.output[0] not in self.m.outputs and \
                        all(_key(u) in self.absorbed for u in users):
                    continue
            self.graph.nodes.append(self.host(node, node_label(node, idx),
                                              "quantization at a host/NPU border"))
        self.graph.outputs = [o.name for o in g.output]
        for o in self.graph.outputs:
            self.tensor(o)
        return self.graph

    def host(self, node: onnx.NodeProto, label: str, reason: str) -> Node:
        for name in list(node.input) + list(node.output):
            if name:
                self.tensor(name)
        return Node("host", label, [i for i in node.input], [o for o in node.output if o],
                    {"onnx_node": node}, device="host", sources=[label], onnx_op=node.op_type,
                    reason=reason)

    def _finish(self, node: onnx.NodeProto, out: _Out) -> None:
        self.absorbed.add(_key(out.q))
        if out.act is not None:
            self.absorbed.add(_key(out.act))
            self.extra_sources.append((node_label(out.act, self.m.index[_key(out.act)]),
                                       out.act.op_type))

    def _npu(self, op: str, label: str, inputs: list[str], out: str, quants: list[Quant],
             out_q: Quant, attrs: dict[str, Any]) -> Node:
        for name, qt in zip(inputs, quants):
            t = self.tensor(name, qt)
            t.dtype = "int8"
        t = self.tensor(out, out_q)
        t.dtype = "int8"
        return Node(op, label, inputs, [out], attrs)

    # Handlers --------------------------------------------------------------------------------
    def _conv_like(self, node: onnx.NodeProto, label: str, x: str, xq: Quant, w: np.ndarray,
                   w_scale: np.ndarray, bias_name: str, attrs: dict[str, Any]) -> Node:
        out = self.m.out(node)
        y, yq = out.name, out.quant
        cout = w.shape[0]
        w_scale = np.broadcast_to(w_scale.reshape(-1), (cout,)).astype(np.float32)
        bias = self.m.bias(bias_name, xq, w_scale, cout)
        wsum = w.reshape(cout, -1).astype(np.int64).sum(axis=1)
        bias = _int32(bias - xq.zero_point * wsum, f"{label}: bias with folded zero point")
        # VECTOR fp32 mode: onnxruntime's float32 requantization (QLinearConv, QGemm, ...).
        mult, shift = requant_params(requant_scales(xq.scale, w_scale, yq.scale), label)
        self._finish(node, out)
        attrs.update(weight=w, bias=bias, mult=mult, shift=shift, fp32=1,
                     zero_point=yq.zero_point, clamp=(out.lo, out.hi), epilogue=[])
        return self._npu("conv", label, [x], y, [xq], yq, attrs)

    def conv(self, node: onnx.NodeProto, label: str) -> Node:
        a = _attrs(node)
        x, xq = self.m.act(node.input[0])
        w, ws, axis = self.m.weight(node.input[1])
        if ws.size != 1 and axis != 0:
            raise Unsupported("weights quantized along an axis other than the output channels")
        shape = self.m.shapes[node.input[0]]
        group = int(a.get("group", 1))
        sp = _spatial(node, a, shape, tuple(w.shape[2:]))
        if w.ndim == 3:
            w = w[:, :, None, :]
        bias = node.input[2] if len(node.input) > 2 else ""
        return self._conv_like(node, label, x, xq, w, ws, bias,
                               {"group": group, **sp, "kind": "conv"})

    def gemm(self, node: onnx.NodeProto, label: str) -> Node:
        if families.is_const_left(self, node):
            return families.const_left(self, node, label)   # A @ X, A constant (GNNs)
        a = _attrs(node)
        if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or \
                float(a.get("beta", 1.0)) != 1.0:
            raise Unsupported("Gemm with transA, alpha != 1 or beta != 1")
        x, xq = self.m.act(node.input[0])
        w, ws, axis = self.m.weight(node.input[1])
        if a.get("transB", 0):
            wt = w                                  # [N, K], scale along axis 0
            if ws.size != 1 and axis != 0:
                raise Unsupported("Gemm weights quantized along K")
        else:
            wt = w.T                                # [K, N] -> [N, K], scale along axis 1
            if ws.size != 1 and axis != 1:
                raise Unsupported("Gemm weights quantized along K")
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and bias in self.m.shapes and math.prod(self.m.shapes[bias]) not in (
                1, wt.shape[0]):
            raise Unsupported("Gemm bias is not a vector over the outputs")
        if len(self.m.shapes[node.input[0]]) != 2:
            raise Unsupported("Gemm input is not 2-D")
        return self._conv_like(node, label, x, xq, np.ascontiguousarray(wt)[:, :, None, None],
                               ws, bias, _dense_attrs())

    def matmul(self, node: onnx.NodeProto, label: str) -> Node:
        if families.is_const_left(self, node):
            return families.const_left(self, node, label)   # A @ X, A constant (GNNs)
        x, xq = self.m.act(node.input[0])
        if node.input[1] not in self.m.producer or \
                self.m.producer[node.input[1]].input[0] not in self.m.consts:
            raise Unsupported("MatMul of two activations (the NPU takes a constant B)")
        w, ws, axis = self.m.weight(node.input[1])
        if w.ndim != 2:
            raise Unsupported("MatMul with a batched constant B")
        if ws.size != 1 and axis not in (1, -1):
            raise Unsupported("MatMul weights quantized along K")
        return self._conv_like(node, label, x, xq, np.ascontiguousarray(w.T)[:, :, None, None],
                               ws, "", _dense_attrs())

    def add(self, node: onnx.NodeProto, label: str) -> Node:
        ins = [i for i in node.input if i]
        if len(ins) != 2:
            raise Unsupported(f"{node.op_type} of {len(ins)} inputs (the NPU adds two)")
        (a, aq), (b, bq) = self.m.act(ins[0]), self.m.act(ins[1])
        if self.m.shapes[ins[0]] != self.m.shapes[ins[1]]:
            raise Unsupported("broadcasting add")
        out = self.m.out(node)
        y, yq = out.name, out.quant
        self._finish(node, out)
        step = add_step(aq, bq, yq, b, out.lo, out.hi, fused=_ort_fuses_add(node, out))
        return self._npu("add", label, [a, b], y, [aq, bq], yq, {"epilogue": [step]})

    def clamp(self, node: onnx.NodeProto, label: str) -> Node:
        x, xq = self.m.act(node.input[0])
        out = self.m.out(node, allow_act=False)
        y, yq = out.name, out.quant
        lo, hi = self.m.act_bounds(node, yq)
        self._finish(node, out)
        step = rescale_step(xq, yq, lo, hi)
        return self._npu("clamp", label, [x], y, [xq], yq, {"epilogue": [step]})

    def _pool(self, node: onnx.NodeProto, op: str, label: str) -> Node:
        a = _attrs(node)
        if len([o for o in node.output if o]) > 1:
            raise Unsupported("MaxPool with an Indices output")
        x, xq = self.m.act(node.input[0])
        out = self.m.out(node)
        y, yq = out.name, out.quant
        shape = self.m.shapes[node.input[0]]
        if len(shape) not in (3, 4):
            raise Unsupported(f"pooling over a rank-{len(shape)} tensor")
        glob = node.op_type.startswith("Global")
        kernel = tuple(shape[2:]) if glob else None
        if a.get("storage_order", 0):
            raise Unsupported("MaxPool storage_order=1")
        sp = _spatial(node, {} if glob else a, shape, kernel, bool(a.get("ceil_mode", 0)))
        self._finish(node, out)
        attrs = {**sp, "count_include_pad": int(a.get("count_include_pad", 0)),
                 "zero_point": yq.zero_point, "epilogue": [], "clamp": (out.lo, out.hi),
                 # The pool's own output scale: fuse may later make it write a concat's or
                 # an absorbed add's tensor, with their rescale as an epilogue step.
                 "out_scale": yq.scale}
        if op == "maxpool" and (xq != yq or (out.lo, out.hi) != (-128, 127)):
            attrs["epilogue"] = [rescale_step(xq, yq, out.lo, out.hi)]
        return self._npu(op, label, [x], y, [xq], yq, attrs)

    def maxpool(self, node: onnx.NodeProto, label: str) -> Node:
        return self._pool(node, "maxpool", label)

    def avgpool(self, node: onnx.NodeProto, label: str) -> Node:
        return self._pool(node, "avgpool", label)

    def concat(self, node: onnx.NodeProto, label: str) -> Node:
        a = _attrs(node)
        ins = [i for i in node.input if i]
        acts = [self.m.act(i) for i in ins]
        shape = self.m.shapes[ins[0]]
        axis = int(a["axis"]) % len(shape)
        # Channels (NHWC axis 1, or the last axis) are written in place at a channel offset;
        # any other axis of a row-major tensor is the channel axis of its 2-D view
        # (prod(shape[:axis]), prod(shape[axis:])) ("generic": copies, see fuse).
        generic = not ((len(shape) == 4 and axis == 1) or axis == len(shape) - 1)
        if generic and len(shape) == 4:
            raise Unsupported(f"Concat along axis {axis} of an NCHW tensor")
        out = self.m.out(node)
        y, yq = out.name, out.quant
        self._finish(node, out)
        steps = [rescale_step(aq, yq, out.lo, out.hi) for _, aq in acts]
        return self._npu("concat", label, [n for n, _ in acts], y, [aq for _, aq in acts], yq,
                         {"axis": axis, "rescale": steps, "generic": generic})

    def reshape(self, node: onnx.NodeProto, label: str) -> Node:
        x, xq = self.m.act(node.input[0])
        out = self.m.out(node, allow_act=False)
        y, yq = out.name, out.quant
        if xq != yq:
            raise Unsupported("a reshape that changes the quantization")
        self._finish(node, out)
        return self._npu("reshape", label, [x], y, [xq], yq, {})

    def gather(self, node: onnx.NodeProto, label: str) -> Node:
        a = _attrs(node)
        if int(a.get("axis", 0)) != 0:
            raise Unsupported("Gather along an axis other than 0")
        data = node.input[0]
        dq = self.m.producer.get(data)
        if dq is None or dq.op_type != "DequantizeLinear":
            raise Unsupported("Gather of float data")
        scale, zp, _ = self.m.qparams(dq)
        if scale.size != 1 or zp.dtype != np.int8:
            raise Unsupported("Gather of per-channel or non-int8 data")
        table = dq.input[0]
        tq = Quant(float(scale.reshape(())), int(zp.reshape(())))
        shape = self.m.shapes[table]
        if len(shape) < 2:
            raise Unsupported("Gather of a 1-D table")
        idx = node.input[1]
        if self.m.dtypes.get(idx) not in ("int64", "int32"):
            raise Unsupported("Gather indices are not integers")
        out = self.m.out(node, allow_act=False)
        y, yq = out.name, out.quant
        if yq != tq:
            raise Unsupported("Gather that changes the quantization")
        self._finish(node, out)
        t = self.tensor(table, tq)
        t.dtype = "int8"
        t.split = 1                       # rows of the table: everything after axis 0
        it = self.tensor(idx)
        n = Node("gather", label, [table, idx], [y], {"index_dtype": it.dtype})
        out = self.tensor(y, yq)
        out.dtype = "int8"
        out.split = len(it.shape)         # one output row per index
        return n


def _ort_fuses_add(node: onnx.NodeProto, out: _Out) -> bool:
    """Whether onnxruntime runs this ``DQ, DQ -> Add [-> act] -> Q`` as its QLinearAdd kernel.

    Its QDQ fusion takes ``Add`` (not ``Sum``) whose output only a QuantizeLinear reads; a
    Relu/Clip in between is first removed when the Q's range makes it redundant (a clamp
    to the whole int8 range, e.g. Relu with zero point -128), otherwise nothing is fused and
    the add runs in float32."""
    return node.op_type == "Add" and (out.lo, out.hi) == (-128, 127)


def _dense_attrs() -> dict[str, Any]:
    return {"group": 1, "kernel": (1, 1), "strides": (1, 1), "dilations": (1, 1),
            "pads": (0, 0, 0, 0), "kind": "dense"}


def legalize(model: onnx.ModelProto) -> Graph:
    """The IR of a (shape-inferred, static) QDQ model."""
    return _Legalizer(model).run()
