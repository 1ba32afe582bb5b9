"""CNN-family builders: digits CNN, 784-128-10 MLP, fixed-weight filters, against numpy/scipy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from scipy import ndimage

from npu.models import cnn
from npu.models._onnx import ModelError
from npu.models.data import accuracy, digits_784, digits_split, upsample


def test_digits_split_is_stratified_and_fixed() -> None:
    s = digits_split()
    assert s.x_train.shape == (1438, 1, 8, 8) and s.x_test.shape == (359, 1, 8, 8)
    assert s.x_train.dtype == np.float32 and 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    assert set(np.unique(s.y_test)) == set(range(10))
    again = digits_split()
    np.testing.assert_array_equal(s.y_test, again.y_test)


def test_upsample_keeps_constant_images_and_shape() -> None:
    img = np.full((2, 1, 8, 8), 0.25, np.float32)
    up = upsample(img, 28)
    assert up.shape == (2, 1, 28, 28)
    np.testing.assert_allclose(up, 0.25, atol=1e-6)
    assert digits_784(digits_split().x_test[:3]).shape == (3, 784)


def test_digits_cnn_matches_numpy_and_is_accurate(ort_run) -> None:
    split = digits_split()
    model = cnn.digits_cnn(batch=len(split.y_test))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["image"]
    logits = ort_run(model, {"image": split.x_test})[0]
    ref = cnn.digits_cnn_forward(cnn.digits_cnn_params(), split.x_test)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    acc = accuracy(logits, split.y_test)
    print(f"digits CNN float test accuracy: {acc:.4f}")
    assert acc >= 0.96


def test_digits_cnn_softmax_head(ort_run) -> None:
    x = digits_split().x_test[:4]
    probs = ort_run(cnn.digits_cnn(batch=4, softmax=True), {"image": x})[0]
    logits = cnn.digits_cnn_forward(cnn.digits_cnn_params(), x)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-5)


def test_digits_cnn_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    p = {k: v.astype(np.float64) for k, v in cnn.digits_cnn_init(1, c1=3, c2=4, hidden=5).items()}
    x = rng.random((2, 1, 8, 8))
    g_out = rng.standard_normal((2, 10))
    cache: dict = {}
    cnn.digits_cnn_forward(p, x, cache)
    grads = cnn._digits_cnn_backward(p, x, cache, g_out)
    for name in ("conv1.weight", "conv2.weight", "conv2.bias", "fc1.weight", "fc2.bias"):
        idx = tuple(rng.integers(0, s) for s in p[name].shape)
        old, eps = p[name][idx], 1e-6
        p[name][idx] = old + eps
        up = float((cnn.digits_cnn_forward(p, x) * g_out).sum())
        p[name][idx] = old - eps
        down = float((cnn.digits_cnn_forward(p, x) * g_out).sum())
        p[name][idx] = old
        assert grads[name][idx] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7)


def test_mlp_784_seeded_matches_numpy(ort_run) -> None:
    model = cnn.mlp_784(batch=5, softmax=False)
    onnx.checker.check_model(model, full_check=True)
    x = digits_784(digits_split().x_test[:5])
    ref = cnn.mlp_784_forward(cnn.mlp_784_init(0), x)
    np.testing.assert_allclose(ort_run(model, {"image": x})[0], ref, rtol=1e-4, atol=1e-5)
    w = [t for t in model.graph.initializer if t.name == "fc1.weight"][0]
    assert list(w.dims) == [784, 128]


def test_mlp_784_trained_on_upsampled_digits(ort_run) -> None:
    split = digits_split()
    model = cnn.mlp_784(batch=len(split.y_test), trained=True)
    probs = ort_run(model, {"image": digits_784(split.x_test)})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    acc = accuracy(probs, split.y_test)
    print(f"784-128-10 MLP float test accuracy: {acc:.4f}")
    assert acc >= 0.9


def test_gaussian_kernel_is_opencv_5x5() -> None:
    k = cnn.gaussian_kernel_5x5()
    np.testing.assert_allclose(k, np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0)


@pytest.mark.parametrize("border,mode", [("zero", "constant"), ("reflect", "mirror")])
def test_gaussian_blur_matches_scipy(ort_run, border: str, mode: str) -> None:
    img = np.random.default_rng(0).random((2, 3, 12, 9)).astype(np.float32)
    model = cnn.gaussian_blur(channels=3, height=12, width=9, batch=2, border=border)
    onnx.checker.check_model(model, full_check=True)
    out = ort_run(model, {"image": img})[0]
    # scipy "mirror" is OpenCV's BORDER_REFLECT_101 (d c b | a b c d | c b a).
    ref = np.stack([np.stack([ndimage.correlate(img[n, c].astype(np.float64),
                                                cnn.gaussian_kernel_5x5(), mode=mode, cval=0.0)
                              for c in range(3)]) for n in range(2)])
    np.testing.assert_allclose(out, ref, atol=1e-6)
    conv = [n for n in model.graph.node if n.op_type == "Conv"][0]
    assert {a.name: a.i for a in conv.attribute if a.name == "group"} == {"group": 3}


def test_moving_average_matches_np_convolve(ort_run) -> None:
    x = np.random.default_rng(1).standard_normal((2, 1, 20)).astype(np.float32)
    out = ort_run(cnn.moving_average(length=20, k=5, batch=2), {"signal": x})[0]
    ref = np.stack([np.convolve(x[n, 0], np.ones(5) / 5, "valid") for n in range(2)])[:, None]
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("call", [
    lambda: cnn.digits_cnn(batch=0),
    lambda: cnn.mlp_784(batch=-1),
    lambda: cnn.gaussian_blur(border="wrap"),
    lambda: cnn.gaussian_blur(channels=2.5),
    lambda: cnn.moving_average(length=3, k=5),
])
def test_bad_arguments_raise_model_error(call) -> None:
    with pytest.raises(ModelError):
        call()
