"""Frontend and quantization passes: loading, static shapes, folding, calibration forms."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from opmodels import Model

from npu.compiler import frontend
from npu.compiler.errors import CompileError
from npu.compiler.quantize import calibration_feeds, is_qdq, quantize_model


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, feeds)


def _conv_bn() -> onnx.ModelProto:
    m = Model(3)
    x = m.input("x", (1, 4, 6, 6))
    c = m.conv(x, 4, 8, 3, pads=[1, 1, 1, 1])
    rng = np.random.default_rng(0)
    bn = m.op("BatchNormalization", [c, m.const((1 + 0.1 * rng.standard_normal(8)).astype(
        np.float32)), m.const((0.1 * rng.standard_normal(8)).astype(np.float32)),
        m.const(rng.standard_normal(8).astype(np.float32)),
        m.const((0.5 + rng.random(8)).astype(np.float32))])
    d = m.op("Dropout", [bn])
    return m.build([m.op("Identity", [m.op("Relu", [d])])])


def test_load_sources(tmp_path) -> None:
    model = _conv_bn()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for src in (model, model.SerializeToString(), str(path), path):
        assert frontend.load_model(src).graph.node[0].op_type == "Conv"
    with pytest.raises(CompileError, match="does not exist"):
        frontend.load_model(tmp_path / "missing.onnx")
    with pytest.raises(CompileError, match="cannot parse"):
        frontend.load_model(b"\x00garbage\xff")
    with pytest.raises(CompileError, match="path, bytes or"):
        frontend.load_model(3.5)


def test_opset_range() -> None:
    model = _conv_bn()
    model.opset_import[0].version = 8
    with pytest.raises(CompileError, match="opset 8 is not supported"):
        frontend.check_opsets(model)


def test_batchnorm_dropout_identity_folded_and_equivalent() -> None:
    model = _conv_bn()
    folded = frontend.prepare_model(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Conv", "Relu"]
    assert folded.graph.output[0].name == model.graph.output[0].name
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_ort(folded, {"x": x})[0], _ort(model, {"x": x})[0], rtol=1e-4,
                               atol=1e-5)


def test_constant_folding_of_constant_of_shape_and_shape() -> None:
    shape = numpy_helper.from_array(np.array([3, 2, 1, 1], np.int64), "w_shape")
    nodes = [helper.make_node("ConstantOfShape", ["w_shape"], ["w"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Reshape", ["c", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 2, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
                          initializer=[shape])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    folded = frontend.prepare_model(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Reshape"]
    w = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}["w"]
    np.testing.assert_array_equal(w, np.full((3, 2, 1, 1), 0.5, np.float32))


def test_dynamic_batch_bound_or_named() -> None:
    model = _conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(CompileError, match=r"'x' has a dynamic dimension 0 \('N'\).*batch"):
        frontend.prepare_model(model)
    bound = frontend.prepare_model(model, batch=2)
    assert bound.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(CompileError, match="dynamic dimension 2"):
        frontend.prepare_model(model, batch=2)


def test_data_dependent_shape_names_the_node() -> None:
    g = helper.make_graph([helper.make_node("NonZero", ["x"], ["y"], name="nz")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, [1, "n"])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(CompileError, match="nz") as err:
        frontend.prepare_model(model)
    assert err.value.op == "NonZero"


def test_gemm_bias_forms_normalized() -> None:
    rng = np.random.default_rng(2)
    for bias in (np.float32(0.3), rng.standard_normal((1, 5)).astype(np.float32),
                 rng.standard_normal((3, 5)).astype(np.float32)):
        m = Model(4)
        x = m.input("x", (3, 6))
        y = m.op("Gemm", [x, m.weight((6, 5)), m.const(np.asarray(bias))], beta=0.5)
        model = m.build([y])
        prepared = frontend.prepare_model(model)
        feeds = {"x": rng.standard_normal((3, 6)).astype(np.float32)}
        np.testing.assert_allclose(_ort(prepared, feeds)[0], _ort(model, feeds)[0], rtol=1e-5,
                                   atol=1e-6)
        gemm = next(n for n in prepared.graph.node if n.op_type == "Gemm")
        inits = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
        if len(gemm.input) > 2:
            assert inits[gemm.input[2]].shape == (5,)


# Quantization ----------------------------------------------------------------------------

def test_calibration_forms(tmp_path) -> None:
    model = frontend.prepare_model(_conv_bn())
    data = np.random.default_rng(0).standard_normal((3, 4, 6, 6)).astype(np.float32)
    feeds = calibration_feeds(model, {"x": data})
    assert len(feeds) == 3 and feeds[0]["x"].shape == (1, 4, 6, 6)
    np.savez(tmp_path / "c.npz", x=data)
    assert len(calibration_feeds(model, str(tmp_path / "c.npz"))) == 3
    assert len(calibration_feeds(model, [{"x": data[:1]}])) == 1
    assert len(calibration_feeds(model, 2)) == 2
    with pytest.raises(CompileError, match="lacks input"):
        calibration_feeds(model, {"y": data})
    with pytest.raises(CompileError, match="has shape"):
        calibration_feeds(model, {"x": data[:, :2]})
    with pytest.raises(CompileError, match="does not exist"):
        calibration_feeds(model, str(tmp_path / "none.npz"))


def test_quantize_static_qdq_per_channel() -> None:
    model = frontend.prepare_model(_conv_bn())
    with pytest.raises(CompileError, match="calibration"):
        quantize_model(model, None)
    qdq = quantize_model(model, 2)
    assert is_qdq(qdq) and not is_qdq(model)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    dq_w = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear"
                and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4)
    assert inits[dq_w.input[0]].dtype == np.int8
    assert inits[dq_w.input[1]].shape == (8,)              # per output channel
    assert not inits[dq_w.input[2]].any()                  # symmetric
    q_x = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert inits[q_x.input[2]].dtype == np.int8            # int8 activations
    assert quantize_model(qdq, None) is qdq                # QDQ taken as it is


def _sparse_matmul_model(dense: np.ndarray, form: str) -> onnx.ModelProto:
    """Y = X @ W with W stored sparse: a Constant's ``sparse_value`` (linear [NNZ] or
    coordinate [NNZ, 2] indices) or a graph ``sparse_initializer``."""
    coords = np.argwhere(dense != 0).astype(np.int64)
    values = numpy_helper.from_array(dense[dense != 0].astype(np.float32), "W")
    idx = coords if form == "coords" else np.ravel_multi_index(tuple(coords.T), dense.shape)
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(
        np.asarray(idx, np.int64), "W_indices"), list(dense.shape))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    sparse_inits = []
    if form == "initializer":
        sparse_inits = [sparse]
    else:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], sparse_value=sparse))
    k, n = dense.shape
    g = helper.make_graph(nodes, "sparse", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [3, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [3, n])], sparse_initializer=sparse_inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("form", ["linear", "coords", "initializer"])
def test_sparse_constants_densified(form: str) -> None:
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(7, 5)) * (rng.random((7, 5)) < 0.3)
    dense[0, 0] = 0.5
    model = _sparse_matmul_model(dense, form)
    prepared = frontend.prepare_model(model)
    assert not any(n.op_type == "Constant" for n in prepared.graph.node)
    assert not len(prepared.graph.sparse_initializer)
    np.testing.assert_array_equal(frontend.constants(prepared.graph)["W"],
                                  dense.astype(np.float32))
    x = rng.normal(size=(3, 7)).astype(np.float32)
    if form != "initializer":  # onnxruntime's own densification, as the oracle
        np.testing.assert_allclose(_ort(prepared, {"x": x})[0], _ort(model, {"x": x})[0],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_ort(prepared, {"x": x})[0], x @ dense, rtol=1e-5, atol=1e-5)


def test_sparse_constant_with_bad_indices_is_named() -> None:
    values = numpy_helper.from_array(np.ones(2, np.float32), "W")
    bad = helper.make_sparse_tensor(values, numpy_helper.from_array(
        np.array([0, 35], np.int64), "i"), [7, 5])
    with pytest.raises(CompileError, match="'W'.*out of range"):
        frontend.sparse_to_dense(bad)
    dup = helper.make_sparse_tensor(values, numpy_helper.from_array(
        np.array([[1, 1], [1, 1]], np.int64), "i"), [7, 5])
    with pytest.raises(CompileError, match="repeats an index"):
        frontend.sparse_to_dense(dup)


def _preactivation_bn() -> onnx.ModelProto:
    """DenseNet's pre-activation unit: Concat -> BatchNormalization -> Mul -> Add (per-channel
    constants, as in the onnx light model) -> Relu -> Conv."""
    m = Model(4)
    x = m.input("x", (1, 6, 8, 8))
    c = m.op("Concat", [x, m.conv(x, 6, 4, 3, pads=[1, 1, 1, 1])], axis=1)
    rng = np.random.default_rng(2)
    bn = m.op("BatchNormalization", [c] + [m.const(v.astype(np.float32)) for v in (
        1 + 0.2 * rng.standard_normal(10), 0.1 * rng.standard_normal(10),
        0.1 * rng.standard_normal(10), 0.5 + rng.random(10))])
    mul = m.op("Mul", [bn, m.const((1 + 0.3 * rng.standard_normal((10, 1, 1))).astype(
        np.float32))])
    add = m.op("Add", [m.const((0.2 * rng.standard_normal((10, 1, 1))).astype(np.float32)), mul])
    return m.build([m.conv(m.op("Relu", [add]), 10, 8, 1)])


def test_unfoldable_batchnorm_becomes_a_depthwise_conv() -> None:
    model = _preactivation_bn()
    prepared = frontend.prepare_model(model)
    ops = [n.op_type for n in prepared.graph.node]
    assert "BatchNormalization" not in ops and "Mul" not in ops and "Add" not in ops, ops
    dw = [n for n in prepared.graph.node if n.op_type == "Conv"
          and helper.get_attribute_value(n.attribute[0]) == 10]
    assert len(dw) == 1
    x = np.random.default_rng(5).standard_normal((1, 6, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_ort(prepared, {"x": x})[0], _ort(model, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)


def test_batchnorm_with_a_shared_output_keeps_its_users() -> None:
    """A Mul whose input is also read elsewhere is not absorbed (the value is still needed)."""
    m = Model(7)
    x = m.input("x", (1, 4, 5, 5))
    rng = np.random.default_rng(3)
    bn = m.op("BatchNormalization", [x] + [m.const(v.astype(np.float32)) for v in (
        1 + 0.2 * rng.standard_normal(4), 0.1 * rng.standard_normal(4),
        0.1 * rng.standard_normal(4), 0.5 + rng.random(4))])
    mul = m.op("Mul", [bn, m.const(np.full((4, 1, 1), 2.0, np.float32))])
    model = m.build([m.op("Add", [mul, bn])])
    prepared = frontend.prepare_model(model)
    ops = [n.op_type for n in prepared.graph.node]
    assert ops.count("Conv") == 1 and "Mul" in ops, ops
    x = np.random.default_rng(6).standard_normal((1, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_ort(prepared, {"x": x})[0], _ort(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)
