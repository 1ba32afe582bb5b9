"""Quantization arithmetic against onnxruntime's integer kernels, exhaustively over int8 inputs.

Each case builds a tiny QDQ model, lets onnxruntime fuse it (``session.qdqisint8allowed``,
default optimizations) and runs it on every int8 input (256 values, or all 65536 pairs): the
oracle the compiler's step parameters (:mod:`npu.compiler.qmath`) must reproduce.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npu import numerics
from npu.compiler.ir import Quant
from npu.compiler.qmath import add_step, qlinear_add, requant_params, rescale_step

_Q8 = np.arange(-128, 128, dtype=np.int64)


def _ort(nodes: list[onnx.NodeProto], inputs: list[str], inits: dict[str, object], n: int,
         out_len: int | None = None) -> tuple[ort.InferenceSession, collections.Counter]:
    """An onnxruntime session on int8 inputs of length ``n`` -> int8 ``y``, and the op types
    of its optimized graph."""
    import tempfile
    from pathlib import Path

    tensors = [numpy_helper.from_array(np.array(v, dtype=np.float32 if isinstance(v, float)
                                                else np.int8), k) for k, v in inits.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, TensorProto.INT8, [n])
                                       for i in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.INT8, [out_len or n])],
                          tensors)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(x.op_type for x in onnx.load(so.optimized_model_filepath)
                                  .graph.node)
    return sess, ops


def _quants(rng: np.random.Generator, k: int) -> list[Quant]:
    return [Quant(float(np.float32(rng.uniform(0.005, 0.2))), int(rng.integers(-20, 21)))
            for _ in range(k)]


def _add_case(a: Quant, b: Quant, y: Quant, op: str, relu: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, collections.Counter]:
    inits = {"sa": a.scale, "za": a.zero_point, "sb": b.scale, "zb": b.zero_point,
             "sy": y.scale, "zy": y.zero_point}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node(op, ["fa", "fb"], ["s"])]
    last = "s"
    if relu:
        nodes.append(helper.make_node("Relu", ["s"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["y"]))
    sess, ops = _ort(nodes, ["a", "b"], inits, 65536)
    va, vb = (v.ravel() for v in np.meshgrid(_Q8, _Q8, indexing="ij"))
    got = sess.run(None, {"a": va.astype(np.int8), "b": vb.astype(np.int8)})[0]
    return va, vb, got.astype(np.int64), ops


@pytest.mark.parametrize("seed", range(3))
def test_qlinear_add_is_onnxruntimes_kernel(seed: int) -> None:
    """DQ, DQ -> Add -> Q is fused into QLinearAdd; qlinear_add computes it on all pairs."""
    a, b, y = _quants(np.random.default_rng(seed), 3)
    va, vb, want, ops = _add_case(a, b, y, "Add", relu=False)
    assert ops["QLinearAdd"] == 1, ops
    np.testing.assert_array_equal(qlinear_add(va, vb, a, b, y), want)


@pytest.mark.parametrize("op, relu, fused", [("Add", False, True), ("Sum", False, False),
                                             ("Add", True, False)])
def test_add_step_targets_the_kernel_onnxruntime_runs(op: str, relu: bool, fused: bool) -> None:
    """The ELTWISE step chosen for the kernel onnxruntime really runs (QLinearAdd, or float
    when it does not fuse) reproduces it on all 65536 pairs."""
    rng = np.random.default_rng(7)
    a, b, y = _quants(rng, 3)
    if relu:
        y = Quant(y.scale, 5)            # Relu not redundant: onnxruntime keeps the float add
    va, vb, want, ops = _add_case(a, b, y, op, relu)
    assert (ops["QLinearAdd"] == 1) == fused, ops
    lo = numerics.clamp(np.rint(0.0) + y.zero_point, -128, 127) if relu else -128

    def score(step) -> tuple[int, int]:
        got = numerics.eltwise_add(va, vb, step.a_zero, step.b_zero, step.a_mult, step.b_mult,
                                   step.shift, step.zero_point, step.clamp_min, step.clamp_max)
        return int(np.count_nonzero(got == want)), int(np.abs(got - want).max())

    right, worst = score(add_step(a, b, y, "b", int(lo), 127, fused=fused))
    assert right == want.size, (right, worst)


def _concat_case(a: Quant, b: Quant, y: Quant) -> np.ndarray:
    """onnxruntime's QLinearConcat of all 256 values of ``a`` and of ``b`` (512 outputs)."""
    inits = {"sa": a.scale, "za": a.zero_point, "sb": b.scale, "zb": b.zero_point,
             "sy": y.scale, "zy": y.zero_point}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["fa"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["fb"]),
             helper.make_node("Concat", ["fa", "fb"], ["c"], axis=0),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["y"])]
    sess, ops = _ort(nodes, ["a", "b"], inits, 256, out_len=512)
    assert ops["QLinearConcat"] == 1, ops
    want = sess.run(None, {"a": _Q8.astype(np.int8), "b": _Q8.astype(np.int8)})[0]
    return want.astype(np.int64)


def _rescaled(st) -> np.ndarray:
    return numerics.eltwise_add(_Q8, _Q8, st.a_zero, st.b_zero, st.a_mult, st.b_mult, st.shift,
                                st.zero_point, st.clamp_min, st.clamp_max)


@pytest.mark.parametrize("seed", range(4))
def test_rescale_matches_qlinear_concat_on_all_values(seed: int) -> None:
    """A Concat of two differently quantized inputs is QLinearConcat; the rescale step of each
    input reproduces its lookup table on all 256 values."""
    a, b, y = _quants(np.random.default_rng(100 + seed), 3)
    want = _concat_case(a, b, y)
    for q, part in ((a, want[:256]), (b, want[256:])):
        st = rescale_step(q, y)
        np.testing.assert_array_equal(_rescaled(st), part, err_msg=str(st))


def test_rescale_is_exact_for_random_quantizations() -> None:
    """onnxruntime's float32 ``Q(DQ(v))`` (QuantizeLinear's division included) on all 256
    values, for random scales and zero points over the whole int8 range."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, y = (Quant(float(np.float32(rng.uniform(0.005, 0.2))), int(rng.integers(-128, 128)))
                for _ in range(2))
        st = rescale_step(a, y)
        want = np.clip(np.rint(((_Q8 - a.zero_point).astype(np.float32) * np.float32(a.scale))
                               / np.float32(y.scale)) + y.zero_point, -128, 127)
        np.testing.assert_array_equal(_rescaled(st), want, err_msg=str(st))


def test_requant_params_are_float32_bit_patterns() -> None:
    scales = np.array([0.0, 1e-3, 0.37, 2.5], np.float32)
    mult, shift = requant_params(scales)
    np.testing.assert_array_equal(numerics.f32_scales(mult), scales)
    assert not shift.any()
    with pytest.raises(Exception, match="channel 1"):
        requant_params(np.array([0.5, np.inf], np.float32), "conv")


@pytest.mark.parametrize("op, act", [("Add", None), ("Add", "Relu"), ("Sum", "Relu"),
                                     ("Sum", None)])
def test_legalize_targets_the_add_onnxruntime_runs(op: str, act: str | None) -> None:
    """After onnxruntime's own quantization, legalize picks QLinearAdd's arithmetic exactly
    when onnxruntime fuses the add into QLinearAdd (its optimized graph says which)."""
    import tempfile
    from pathlib import Path

    from opmodels import Model, feeds

    from npu.compiler.frontend import prepare_model
    from npu.compiler.passes import legalize
    from npu.compiler.quantize import quantize_model

    m = Model(11)
    x = m.input("x", (1, 8, 4, 4))
    y = m.op(op, [m.conv(x, 8, 8, 1), m.conv(x, 8, 8, 1)])
    if act:
        y = m.op(act, [y])
    model = m.build([m.conv(y, 8, 4, 1)])
    qdq = prepare_model(quantize_model(prepare_model(model),
                                       feeds(model, np.random.default_rng(0), 2)))
    steps = [st for n in legalize.legalize(qdq).nodes for st in n.attrs.get("epilogue", [])
             if st.kind == "add"]
    assert len(steps) == 1
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
        fused = any(n.op_type == "QLinearAdd"
                    for n in onnx.load(so.optimized_model_filepath).graph.node)
    if op == "Sum" or act is None:     # onnxruntime fuses Add, never Sum
        assert fused == (op == "Add")
    g = legalize.legalize(qdq)
    node = next(n for n in g.nodes if n.op == "add")
    aq, bq = (g.tensors[i].quant for i in node.inputs)
    yq = g.tensors[node.outputs[0]].quant
    st = steps[0]
    want = add_step(aq, bq, yq, st.other, st.clamp_min, st.clamp_max, fused=fused)
    assert (st.a_mult, st.b_mult, st.shift) == (want.a_mult, want.b_mult, want.shift)
