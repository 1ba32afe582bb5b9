"""onnx's backend node tests for the supported operators, through :class:`NpuBackend`.

The cases come from the ``onnx`` package's own generators (``onnx.backend.test.case.node``; the
wheel ships no data files). Weight-like inputs (Conv W, Gemm B, Reshape shape, ...) become
initializers (:func:`constant_inputs`); the test's own inputs calibrate the quantization.

These are float tests run through int8 quantization, so outputs are compared with a tolerance
derived from the quantization step: ours may be off the expected float values by at most
onnxruntime's own error on the same QDQ model plus one output quantization step. Ours and
onnxruntime's int8 values must also be within one step of each other.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from opmodels import ort_session

from npu.compiler.backend import NpuBackend, constant_inputs
from npu.compiler.errors import CompileError

SUPPORTED = ("Conv", "Gemm", "MatMul", "Relu", "Clip", "Add", "Sum", "Concat", "MaxPool",
             "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape",
             "Squeeze", "Unsqueeze", "Gather")

#: Cases whose operator legitimately runs on the host, and why (everything else in the
#: supported set must run on the NPU).
HOST_EXPECTED = {
    "test_averagepool_3d_default": "3-D pooling",
    "test_averagepool_3d_dilations_small": "3-D pooling",
    "test_maxpool_3d_default": "3-D pooling",
    "test_maxpool_3d_dilations": "3-D pooling",
    "test_maxpool_3d_dilations_use_ref_impl": "3-D pooling",
    "test_maxpool_3d_dilations_use_ref_impl_large": "3-D pooling",
    "test_maxpool_with_argmax_2d_precomputed_pads": "Indices output",
    "test_maxpool_with_argmax_2d_precomputed_strides": "Indices output",
    "test_gemm_transposeA": "transA",
    "test_gemm_alpha": "alpha != 1",
    "test_gemm_beta": "beta != 1",
    "test_gemm_all_attributes": "transA, alpha, beta",
    "test_gemm_default_matrix_bias": "bias is a matrix",
    "test_sum_example": "three inputs",
    "test_sum_one_input": "one input",
    "test_add_bcast": "broadcasting",
    "test_matmul_bcast": "batched B",
    "test_matmul_4d": "batched B",
    "test_matmul_1d_1d": "1-D operands",
    "test_matmul_1d_3d": "batched B",
    "test_matmul_4d_1d": "1-D B",
    "test_matmul_3d": "batched B",
    "test_gather_1": "axis 1",
    "test_gather_2d_indices": "axis 1",
    "test_gather_negative_indices": "1-D table",
}


def _cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    out = []
    for c in cases:
        if "_expanded" in c.name or not c.data_sets:
            continue
        ops = {n.op_type for n in c.model.graph.node}
        if len(ops) != 1 or ops.pop() not in SUPPORTED:
            continue
        out.append(c)
    return out


CASES = {c.name: c for c in _cases()}


def _float_case(case):
    inputs, expected = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    model, feeds = constant_inputs(case.model, dict(zip(names, inputs)))
    if any(v.size == 0 for v in feeds.values()):
        return None
    if not feeds or any(v.dtype != np.float32 for k, v in feeds.items()
                        if k not in ("indices",)) or expected[0].dtype != np.float32:
        return None
    return model, feeds, expected


def _output_scale(qdq: onnx.ModelProto, name: str) -> float:
    prod = {o: n for n in qdq.graph.node for o in n.output}
    node = prod.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return 0.0
    init = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    return float(np.max(init[node.input[1]]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_node(name: str) -> None:
    prepared = _float_case(CASES[name])
    if prepared is None:
        pytest.skip("not a float model (integer or empty tensors): nothing to quantize")
    model, feeds, expected = prepared
    try:
        rep = NpuBackend.prepare(model, calibration=[feeds])
    except CompileError as exc:
        pytest.fail(f"compile error: {exc}")
    outs = rep.run(feeds)
    sess = rep.session
    # The float QDQ graph: onnxruntime's fused int8 kernels reject some valid attributes
    # (e.g. QLinearAveragePool with dilations).
    ref = ort_session(sess.qdq_model, kernels="float").run(None, feeds)
    for out, want, theirs, o in zip(outs, expected, ref, sess.get_outputs()):
        step = _output_scale(sess.qdq_model, o.name)
        tol = float(np.max(np.abs(theirs - want), initial=0)) + step + 1e-5
        err = float(np.max(np.abs(out - want), initial=0))
        assert err <= tol, f"{o.name}: off by {err:.4g} > {tol:.4g} (step {step:.3g})"
        if step:
            assert np.max(np.abs(out - theirs), initial=0) <= step * 1.001 + 1e-6
    op = CASES[name].model.graph.node[0].op_type
    if name in HOST_EXPECTED or ("_3d" in name and "pool" in name):   # 3-D pooling: host
        return
    if not _quantized(sess.qdq_model, op):
        return    # onnxruntime left the op in float (e.g. a Relu on a graph input): host
    rows = [r for r in sess.report()["nodes"] if r["op"].split("+")[0] == op]
    assert rows and all(r["where"].startswith("npu") or
                        r["reason"] == "nothing to compute between host nodes" for r in rows), \
        f"{op} ran on the host: {rows}"


def _quantized(qdq: onnx.ModelProto, op: str) -> bool:
    """True when onnxruntime's quantizer put the op between DequantizeLinear and
    QuantizeLinear nodes (only then can it run on an int8 NPU)."""
    prod = {o: n for n in qdq.graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in qdq.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    for n in qdq.graph.node:
        if n.op_type != op:
            continue
        ins = [prod.get(i) for i in n.input[:1]]
        outs = cons.get(n.output[0], [])
        if all(p is not None and p.op_type == "DequantizeLinear" for p in ins) and outs and \
                all(c.op_type in ("QuantizeLinear", "Relu", "Clip") for c in outs):
            return True
    return False
