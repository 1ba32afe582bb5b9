"""SqueezeNet and ResNet-50 from the onnx wheel's light models, end to end on npu16.

For each model: quantized by onnxruntime on seeded calibration images, compiled, run on the
numba engine, compared with onnxruntime running the same QDQ model on its integer kernels
(QLinearConv, QGemm, QLinearConcat, QLinearAveragePool, ...; see :mod:`npu.compiler.qmath`).
Checks:

* the programs compute exactly the IR's integer semantics (every tensor, bit for bit);
* layer by layer, fed onnxruntime's int8 inputs, the IR computes onnxruntime's int8 outputs
  bit for bit (every layer, residual adds included);
* end to end, >= 99% of the int8 logits are identical to onnxruntime's (measured: 100%) and
  none is off by more than one, and the logits are >= 0.99 cosine-similar to the float model.

These random-weight networks amplify any one-step difference (``test_single_step_is_amplified``),
so the end-to-end identity holds only because every layer is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from modelcheck import cosine, float_tensor, ort_tensors, teacher_forced
from opmodels import agreement, ort_session

from npu.compiler.reference import run_graph
from npu.compiler.session import InferenceSession


@dataclass
class Run:
    model: onnx.ModelProto
    sess: InferenceSession
    feeds: dict
    logits: str          # float tensor feeding the final Softmax
    ort: dict

    @property
    def q_logits(self) -> str:
        return f"{self.logits}_QuantizeLinear_Output"

    def dequant(self, values: np.ndarray) -> np.ndarray:
        q = self.sess.graph.tensors[self.q_logits].quant
        return (values.astype(np.float32) - q.zero_point) * q.scale


def _softmax_input(model: onnx.ModelProto) -> str:
    return [n for n in model.graph.node if n.op_type == "Softmax"][-1].input[0]


def _run(model: onnx.ModelProto, n_calib: int = 2) -> Run:
    from npu.models.light import light_input

    inp = model.graph.input[0].name
    calib = [{inp: light_input(1, seed=s)} for s in range(1, 1 + n_calib)]
    sess = InferenceSession(model, "npu16", calib, observe="all")
    feeds = {inp: light_input(1, seed=100)}
    sess.run(None, feeds)
    return Run(model, sess, feeds, _softmax_input(model), ort_tensors(sess.qdq_model, feeds))


def _check_reference(run: Run) -> None:
    ref = run_graph(run.sess.graph, run.feeds)
    compared = 0
    for name, value in run.sess.tensors.items():
        if isinstance(value, np.ndarray) and value.dtype == np.int8 and name in ref:
            np.testing.assert_array_equal(value, ref[name], err_msg=name)
            compared += 1
    assert compared >= 20


def _check_layers(run: Run, min_layers: int) -> None:
    """Every NPU layer, fed onnxruntime's int8 inputs, computes its int8 output exactly."""
    result = teacher_forced(run.sess.graph, run.ort)
    assert len(result) >= min_layers
    bad = {k: v for k, v in result.items() if v != (1.0, 0)}
    assert not bad, bad


def _check_output(run: Run, min_same: float) -> None:
    """Logits: ``min_same`` identical to onnxruntime's int8 kernels, none off by more than
    one, same top-1, and >= 0.99 cosine-similar to the float model."""
    ours = run.dequant(run.sess.tensors[run.q_logits])
    theirs = run.dequant(run.ort[run.q_logits])
    same, worst = agreement(run.sess.tensors[run.q_logits], run.ort[run.q_logits])
    assert same >= min_same and worst <= 1, (same, worst)
    assert ours.argmax() == theirs.argmax()
    ref = float_tensor(run.model, run.logits, run.feeds)
    assert cosine(ours, ref) >= 0.99
    assert cosine(theirs, ref) >= 0.99


# --------------------------------------------------------------------------------------------
# SqueezeNet (default suite)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def squeezenet() -> Run:
    from npu.models.light import light_model

    return _run(light_model("squeezenet"))


def test_squeezenet_programs_compute_the_ir(squeezenet: Run) -> None:
    _check_reference(squeezenet)


def test_squeezenet_layers_match_onnxruntime(squeezenet: Run) -> None:
    _check_layers(squeezenet, 29)


def test_squeezenet_output(squeezenet: Run) -> None:
    _check_output(squeezenet, 0.99)      # measured: 100% identical


def test_squeezenet_runs_on_the_npu(squeezenet: Run) -> None:
    rep = squeezenet.sess.report()
    assert len(rep["segments"]) == 1
    assert {r["op"] for r in rep["host_fallbacks"]} <= {"Softmax", "QuantizeLinear",
                                                         "DequantizeLinear", "Reshape"}


def test_single_step_is_amplified(squeezenet: Run) -> None:
    """onnxruntime against itself: change one int8 value of the first pooling output by one
    step, run the rest of the QDQ model, and most logits change: why end-to-end identity needs
    every layer bit-exact (fp32 requantization, 23-bit ELTWISE multipliers), not just close."""
    import tempfile
    from pathlib import Path

    qdq = squeezenet.sess.qdq_model
    cut = next(n.output[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"
               and "r2" in n.output[0])
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "q.onnx", Path(tmp) / "tail.onnx"
        onnx.save(qdq, str(src))
        onnx.utils.extract_model(str(src), str(dst), [cut], [squeezenet.q_logits])
        tail = ort_session(onnx.load(str(dst)))
    base = squeezenet.ort[cut]
    flipped = base.copy().reshape(-1)
    flipped[flipped.size // 2] = np.int8(min(int(flipped[flipped.size // 2]) + 1, 127))
    a = tail.run(None, {cut: base})[0]
    b = tail.run(None, {cut: flipped.reshape(base.shape)})[0]
    same, _ = agreement(a, b)
    assert same < 0.9


# --------------------------------------------------------------------------------------------
# ResNet-50 (slow)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50() -> Run:
    from npu.models.light import light_model

    return _run(light_model("resnet50"))


@pytest.mark.slow
def test_resnet50_programs_compute_the_ir(resnet50: Run) -> None:
    _check_reference(resnet50)


@pytest.mark.slow
def test_resnet50_layers_match_onnxruntime(resnet50: Run) -> None:
    _check_layers(resnet50, 55)


@pytest.mark.slow
def test_resnet50_output(resnet50: Run) -> None:
    _check_output(resnet50, 0.99)        # measured: 100% identical
    assert len(resnet50.sess.report()["segments"]) == 1
