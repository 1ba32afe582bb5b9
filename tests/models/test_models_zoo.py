"""The model registry: every entry builds, checks, runs in onnxruntime on its calibration data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from npu.models._onnx import ModelError
from npu.models.zoo import MODELS, calibration_data

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64}
# The light models are checked in test_models_light.py; here only in the slow set.
SMALL = [n for n, e in MODELS.items() if not e.tags & {"large", "light"}]
LARGE = [n for n, e in MODELS.items() if e.tags & {"large", "light"}]


def _check_entry(name: str, ort_session) -> None:
    entry = MODELS[name]
    model = entry()
    onnx.checker.check_model(model, full_check=True)
    feeds = calibration_data(name, 2)
    assert len(feeds) == 2
    for inp in model.graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert all(d > 0 for d in dims), f"{name}: {inp.name} has a dynamic shape"
        for f in feeds:
            assert f[inp.name].shape == tuple(dims), (name, inp.name)
            assert f[inp.name].dtype == _NP[inp.type.tensor_type.elem_type], (name, inp.name)
    assert set(feeds[0]) == {i.name for i in model.graph.input}
    sess = ort_session(model)
    for f in feeds:
        for out in sess.run(None, f):
            assert np.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_registry_entry(name: str, ort_session) -> None:
    _check_entry(name, ort_session)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_large_registry_entry(name: str, ort_session) -> None:
    _check_entry(name, ort_session)


def test_registry_covers_the_three_families() -> None:
    families = {e.family for e in MODELS.values()}
    assert families == {"cnn", "nerf", "gnn"}
    assert all(e.description for e in MODELS.values())
    for name in ("digits_cnn", "mlp_784", "gaussian_blur", "resnet50", "squeezenet", "nerf",
                 "nerf_encoding", "nerf_scene", "instant_ngp_mlp", "gcn_karate",
                 "graphsage_karate", "gin_karate", "gcn_sbm", "graphsage_sbm", "gin_sbm"):
        assert name in MODELS


def test_calibration_data_is_real_and_varied() -> None:
    a, b = calibration_data("digits_cnn", 2)
    assert not np.array_equal(a["image"], b["image"])
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    nerf_feeds = calibration_data("nerf_scene", 1)[0]
    assert (np.linalg.norm(nerf_feeds["xyz"], axis=1) <= 1.35 + 1e-5).all()


def test_calibration_data_errors() -> None:
    with pytest.raises(ModelError, match="unknown model"):
        calibration_data("lenet5")
    with pytest.raises(ModelError, match="n must be"):
        calibration_data("digits_cnn", 0)
