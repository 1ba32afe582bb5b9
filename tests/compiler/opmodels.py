"""Small float ONNX models (one operator or a short chain) and the onnxruntime comparison.

:func:`compare` quantizes a float model with onnxruntime (through the compiler), runs the
compiled program on the simulator and onnxruntime on the *same* QDQ model, and returns the int8
values of every graph output's QuantizeLinear for both. onnxruntime runs its integer kernels
(``kernels="int8"``: ``session.qdqisint8allowed`` with the default graph optimizations fuse
DQ-Conv-Q into QLinearConv, DQ-Gemm-Q into QGemm, Concat into QLinearConcat, ...), which is
what the compiler reproduces bit for bit (see :mod:`npu.compiler.qmath`); ``kernels="float"``
runs the unfused QDQ graph (dequantize, float op, quantize; graph optimizations off), whose
float convolutions sum in an order no integer machine reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from npu.compiler.quantize import onnxruntime_session
from npu.compiler.session import InferenceSession

OPSET = 17


class Model:
    """A graph under construction with seeded random float weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.k = 0

    def input(self, name: str, shape: Sequence[int], dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        self.k += 1
        name = f"{hint}{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape: Sequence[int], scale: float | None = None) -> str:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
        s = scale if scale is not None else np.sqrt(2.0 / max(fan, 1))
        return self.const((self.rng.standard_normal(shape) * s).astype(np.float32), "w")

    def op(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        self.k += 1
        out = f"{op.lower()}{self.k}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"{op}_{self.k}",
                                           **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int | tuple[int, int] = 3, bias: bool = True,
             group: int = 1, **attrs: Any) -> str:
        kk = (k, k) if isinstance(k, int) else k
        w = self.weight((cout, cin // group) + kk)
        ins = [x, w] + ([self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32),
                                    "b")] if bias else [])
        return self.op("Conv", ins, group=group, **attrs)

    def build(self, outputs: Sequence[str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs,
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                   for o in outputs], initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=8)
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        # Declare the outputs' inferred shapes (the checker wants a shape on outputs).
        known = {vi.name: vi for vi in model.graph.value_info}
        for out in model.graph.output:
            if out.name in known:
                out.type.CopyFrom(known[out.name].type)
        del model.graph.value_info[:]
        return model


def feeds(model: onnx.ModelProto, rng: np.random.Generator, n: int = 1
          ) -> list[dict[str, np.ndarray]]:
    """``n`` random feed dicts for the model's inputs (float normal, int64 small indices)."""
    out = []
    for _ in range(n):
        d = {}
        for inp in model.graph.input:
            shape = [x.dim_value for x in inp.type.tensor_type.shape.dim]
            if inp.type.tensor_type.elem_type == TensorProto.INT64:
                d[inp.name] = rng.integers(0, 8, size=shape).astype(np.int64)
            else:
                d[inp.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(d)
    return out


def ort_session(qdq: onnx.ModelProto, extra: Sequence[str] = (), kernels: str = "int8"
                ) -> ort.InferenceSession:
    """onnxruntime on a QDQ model with extra int8 outputs: its fused integer kernels
    (``kernels="int8"``) or the unfused float QDQ graph (``"float"``, optimizations off);
    see :func:`npu.compiler.quantize.onnxruntime_session`."""
    return onnxruntime_session(qdq, kernels, extra)


def output_q_tensors(qdq: onnx.ModelProto) -> list[str]:
    """The int8 tensors whose dequantization are the graph outputs."""
    prod = {o: n for n in qdq.graph.node for o in n.output}
    out = []
    for o in qdq.graph.output:
        n = prod.get(o.name)
        if n is not None and n.op_type == "DequantizeLinear":
            out.append(n.input[0])
    return out


def compare(model: onnx.ModelProto, config: str = "npu16", seed: int = 0, engine: str = "numba",
            calib_n: int = 4, observe: Any = (), kernels: str = "int8"
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], InferenceSession]:
    """(npu int8, onnxruntime int8) of the outputs' quantized tensors, and the session;
    ``kernels`` as in :func:`ort_session`."""
    rng = np.random.default_rng(seed)
    calib = feeds(model, rng, calib_n)
    sess = InferenceSession(model, config, calibration=calib, engine=engine, observe=observe)
    names = output_q_tensors(sess.qdq_model)
    if observe == "all":
        names = [n.output[0] for n in sess.qdq_model.graph.node
                 if n.op_type == "QuantizeLinear"]
    osess = ort_session(sess.qdq_model, [n for n in names
                                         if n not in {o.name for o in sess.qdq_model.graph.output}],
                        kernels)
    x = feeds(model, rng, 1)[0]
    sess.run(None, x)
    ours = {n: sess.tensors[n] for n in names if n in sess.tensors}
    theirs = dict(zip([o.name for o in osess.get_outputs()], osess.run(None, x)))
    return ours, {n: theirs[n] for n in ours}, sess


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """(fraction identical, largest absolute difference) of two int8 arrays."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.mean(a == b)), int(np.abs(a - b).max(initial=0))


def programs_match_ir(sess: InferenceSession, feeds: dict[str, np.ndarray]) -> int:
    """Run with every intermediate stored; each must equal the IR interpreter's value.
    Returns how many int8 tensors were compared."""
    from npu.compiler.reference import run_graph

    sess = InferenceSession(sess.qdq_model, sess.compiled.config, observe="all")
    ref = run_graph(sess.graph, feeds)
    sess.run(None, feeds)
    n = 0
    for name, value in sess.tensors.items():
        if isinstance(value, np.ndarray) and value.dtype == np.int8 and name in ref:
            np.testing.assert_array_equal(value, ref[name], err_msg=name)
            n += 1
    return n
