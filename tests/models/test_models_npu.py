"""Every model through the NPU (compiler + cycle-level simulator) against onnxruntime, and the
three accuracy checks of issue 7: digits, NeRF render, karate club."""

from __future__ import annotations

import pytest

from npu.models import checks, nerf
from npu.models.zoo import MODELS, calibration_data

pytest.importorskip("npu.compiler.session")

# Known compiler gaps (issue 6), reported; these flip to XPASS when fixed.
_GAPS = {
    # Runs entirely on the NPU and every layer but three matches onnxruntime's int8 kernels
    # exactly; the three 2x2 transition AveragePools differ by one at exact ties (22%: the NPU
    # rounds half to even, QLinearAveragePool does not), and 58 layers amplify that (logits
    # ~18% identical, max 10; cosine 0.9985 to onnxruntime, same top-1). See docs/compiler.md.
    "densenet121": "int8 AveragePool ties amplified over 120 layers (cosine 0.998, top-1 same)",
    # The same for the 3x3 AveragePools of its inception modules: 76 of 83 layers exact, the
    # 7 pools 98.1-99.99% (one step at float ties); logits 29% identical (max 6), the host
    # Softmax's int8 probabilities 98.9% (max 15). Cosine and top-1: see below.
    "inception_v2": "int8 AveragePool ties amplified by the host Softmax (max diff 15 > 8)",
}
# Deep networks accumulate one-LSB requantization differences over 20-120 layers and end in
# a host Softmax that magnifies them: the int8 probabilities agree less exactly.
_DEEP = {"squeezenet", "shufflenet", "inception_v1", "inception_v2", "densenet121",
         "resnet50"}
_FAST = ["digits_cnn", "mlp_784", "gaussian_blur", "moving_average", "nerf", "nerf_encoding",
         "nerf_scene", "instant_ngp_mlp", "gcn_karate", "graphsage_karate", "gin_karate"]
# The FC-heavy giants (AlexNet, VGG-19, ZFNet: 60-140 M parameters) are checked in
# onnxruntime only (test_models_zoo.py); quantizing them alone takes minutes.
_SLOW = [n for n in MODELS if n not in _FAST and n not in ("bvlc_alexnet", "vgg19", "zfnet512")]


def _param(name: str):
    marks = [pytest.mark.xfail(reason=_GAPS[name], strict=False)] if name in _GAPS else []
    return pytest.param(name, marks=marks, id=name)


def _agree(name: str) -> checks.Agreement:
    sess = checks._session(MODELS[name](), "npu16", calibration_data(name, 4))
    feeds = calibration_data(name, 5, seed=1)[-1]  # not one of the calibration inputs
    return checks.int8_agreement(sess, feeds)


def _assert_agree(name: str) -> None:
    agreement = _agree(name)
    print(f"{name}: NPU vs onnxruntime int8 identical {agreement.identical:.4f}, "
          f"max difference {agreement.max_diff}")
    min_identical, max_diff = (0.95, 8) if name in _DEEP else (0.98, 3)
    assert agreement.identical >= min_identical, agreement
    assert agreement.max_diff <= max_diff, agreement


@pytest.mark.parametrize("name", [_param(n) for n in _FAST])
def test_npu_matches_onnxruntime(name: str) -> None:
    _assert_agree(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [_param(n) for n in _SLOW])
def test_npu_matches_onnxruntime_large(name: str) -> None:
    _assert_agree(name)


def test_digits_accuracy_on_the_npu() -> None:
    r = checks.digits_check()
    print(f"digits CNN test accuracy: float {r.float_accuracy:.4f}, NPU int8 "
          f"{r.npu_accuracy:.4f} ({r.n_images} images)")
    assert r.n_images == 359
    assert r.float_accuracy >= 0.96
    assert abs(r.npu_accuracy - r.float_accuracy) <= 0.01


@pytest.mark.parametrize("kind", ["gcn", "gin", "sage"])
def test_karate_predictions_on_the_npu(kind: str) -> None:
    r = checks.karate_check(kind)
    print(f"{kind} karate: NPU/float agreement {r.agreement:.4f}, accuracy float "
          f"{r.float_accuracy:.4f} NPU {r.npu_accuracy:.4f}")
    assert r.agreement >= 0.97


def test_nerf_render_on_the_npu_small_view() -> None:
    """A reduced 32x32 view for the fast suite (the 100x100 one is slow)."""
    r = checks.nerf_check(size=32, batch=4096)
    print(f"NeRF 32x32: PSNR NPU vs float {r.psnr_npu_vs_float:.2f} dB")
    assert r.psnr_npu_vs_float >= 30.0


@pytest.mark.slow
def test_nerf_render_on_the_npu(tmp_path) -> None:
    r = checks.nerf_check(size=100)
    print(f"NeRF 100x100 ({r.n_points} points, {r.runs} NPU runs): PSNR NPU vs float "
          f"{r.psnr_npu_vs_float:.2f} dB, float vs truth {r.psnr_float_vs_truth:.2f} dB, "
          f"NPU vs truth {r.psnr_npu_vs_truth:.2f} dB")
    assert r.psnr_npu_vs_float >= 30.0
    for name, img in (("npu", r.npu_image), ("float", r.float_image)):
        assert nerf.save_png(tmp_path / f"nerf_{name}.png", img).stat().st_size > 1000


def _close_to_onnxruntime(name: str, sess=None) -> None:
    """The model's outputs agree with onnxruntime's int8 kernels on the same QDQ model by
    cosine (>= 0.995) and top-1, and are as close to the float model as onnxruntime's."""
    import numpy as np

    model = MODELS[name]()
    if sess is None:
        sess = checks._session(model, "npu16", calibration_data(name, 4))
    feeds = calibration_data(name, 5, seed=1)[-1]
    ours = sess.run(None, feeds)[0].ravel().astype(np.float64)
    qdq = checks._ort(sess.qdq_model, "int8").run(None, feeds)[0].ravel()
    flt = checks._ort(model).run(None, feeds)[0].ravel().astype(np.float64)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    print(f"{name}: cosine NPU/onnxruntime {cos(ours, qdq):.5f}, NPU/float "
          f"{cos(ours, flt):.5f}, onnxruntime/float {cos(qdq, flt):.5f}")
    assert cos(ours, qdq) >= 0.995
    assert ours.argmax() == qdq.argmax()
    assert cos(ours, flt) >= cos(qdq, flt) - 0.005


@pytest.mark.slow
def test_densenet121_runs_on_the_npu_close_to_onnxruntime() -> None:
    """DenseNet-121's pre-activation BatchNorm+Mul+Add chains run as depthwise convolutions, so
    nothing but the input/output conversions is left on the host; its logits agree with
    onnxruntime on the same QDQ model by cosine and top-1 (the exact int8 identity does not
    hold end to end, see ``_GAPS``)."""
    name = "densenet121"
    sess = checks._session(MODELS[name](), "npu16", calibration_data(name, 4))
    rep = sess.compiled.report()
    assert not rep["host_fallbacks"], rep["host_fallbacks"][:5]
    assert len(rep["segments"]) == 1
    _close_to_onnxruntime(name, sess)


@pytest.mark.slow
def test_inception_v2_close_to_onnxruntime() -> None:
    """Inception-v2's 3x3 AveragePools round float ties as onnxruntime cannot be matched by an
    integer pool (see ``_GAPS``); the outputs still agree by cosine and top-1."""
    _close_to_onnxruntime("inception_v2")
