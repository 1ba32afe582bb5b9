"""NeRF MLPs, encoding, renderer and the trained scene NeRF against numpy and closed forms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from npu.models import nerf
from npu.models._onnx import ModelError


def test_documented_network_sizes() -> None:
    """595,844 parameters and 593,408 MACs per point (models-from-seeds.md section 1)."""
    shape = nerf.NeRFShape()
    assert (shape.in_pos, shape.in_dir) == (63, 27)
    assert shape.n_params() == 595_844
    assert shape.macs_per_point() == 593_408
    assert shape.param_shapes()["pts.5"] == (319, 256)
    assert shape.param_shapes()["views.0"] == (283, 128)


def test_positional_encoding_formula() -> None:
    p = np.array([[0.1, -0.7, 1.3], [0.0, 0.5, -1.0]], np.float32)
    enc = nerf.positional_encoding(p, 3)
    assert enc.shape == (2, 21)
    expect = [p]
    for k in range(3):
        expect += [np.sin(2.0**k * np.pi * p), np.cos(2.0**k * np.pi * p)]
    np.testing.assert_allclose(enc, np.concatenate(expect, axis=1), atol=1e-6)


def _inputs(shape: nerf.NeRFShape, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1.3, 1.3, (n, 3)).astype(np.float32)
    d = rng.standard_normal((n, 3))
    d = (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)
    return pts, d


def test_documented_nerf_matches_numpy(ort_run) -> None:
    model = nerf.nerf_mlp(batch=32, seed=3)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x_enc", "d_enc"]
    assert [o.name for o in model.graph.output] == ["raw"]
    pts, d = _inputs(nerf.NeRFShape(), 32)
    x_enc, d_enc = nerf.positional_encoding(pts, 10), nerf.positional_encoding(d, 4)
    out = ort_run(model, {"x_enc": x_enc, "d_enc": d_enc})[0]
    ref = nerf.nerf_forward(nerf.nerf_init(nerf.NeRFShape(), 3), x_enc, d_enc)
    assert out.shape == (32, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    # The skip: layer 5 reads Concat(x_enc, h); the view branch reads Concat(feature, d_enc).
    concats = [n for n in model.graph.node if n.op_type == "Concat"]
    assert concats[0].input[0] == "x_enc" and concats[1].input[1] == "d_enc"


def test_encoding_in_graph_equals_host_encoding(ort_run) -> None:
    kw = {"batch": 40, "depth": 4, "width": 32, "skips": (1,), "seed": 5}
    pts, d = _inputs(nerf.NeRFShape(4, 32, (1,)), 40, seed=1)
    in_graph = nerf.nerf_mlp(encode_in_graph=True, **kw)
    onnx.checker.check_model(in_graph, full_check=True)
    assert {"Sin", "Cos"} <= {n.op_type for n in in_graph.graph.node}
    out = ort_run(in_graph, {"xyz": pts, "viewdir": d})[0]
    host = ort_run(nerf.nerf_mlp(**kw), {"x_enc": nerf.positional_encoding(pts, 10),
                                         "d_enc": nerf.positional_encoding(d, 4)})[0]
    np.testing.assert_allclose(out, host, rtol=1e-4, atol=2e-4)


def test_activations_in_graph(ort_run) -> None:
    kw = {"batch": 16, "depth": 3, "width": 16, "skips": (), "seed": 2}
    pts, d = _inputs(nerf.NeRFShape(3, 16, ()), 16)
    feeds = {"xyz": pts, "viewdir": d}
    raw = ort_run(nerf.nerf_mlp(encode_in_graph=True, **kw), feeds)[0]
    act = ort_run(nerf.nerf_mlp(encode_in_graph=True, activations=True, **kw), feeds)[0]
    rgb, sigma = nerf.raw_to_rgb_sigma(raw)
    np.testing.assert_allclose(act[:, :3], rgb, atol=1e-6)
    np.testing.assert_allclose(act[:, 3], sigma, atol=1e-6)


def test_nerf_backward_matches_finite_differences() -> None:
    shape = nerf.NeRFShape(4, 8, (1,), 2, 1)
    p = {k: v.astype(np.float64) for k, v in nerf.nerf_init(shape, 3).items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, shape.in_pos))
    d = rng.standard_normal((5, shape.in_dir))
    cache: list = []
    g_out = rng.standard_normal(nerf.nerf_forward(p, x, d, cache).shape)
    grads = nerf._nerf_backward(p, cache, g_out)
    for name in ("pts.0.weight", "pts.2.weight", "pts.3.bias", "views.0.weight", "alpha.bias",
                 "feature.weight", "rgb.weight"):
        idx = tuple(rng.integers(0, s) for s in p[name].shape)
        old, eps = p[name][idx], 1e-6
        p[name][idx] = old + eps
        up = float((nerf.nerf_forward(p, x, d) * g_out).sum())
        p[name][idx] = old - eps
        down = float((nerf.nerf_forward(p, x, d) * g_out).sum())
        p[name][idx] = old
        assert grads[name][idx] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7)


def test_instant_ngp_mlp_matches_numpy(ort_run) -> None:
    model = nerf.instant_ngp_mlp(batch=64, seed=4)
    onnx.checker.check_model(model, full_check=True)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == 1)
    assert 9_000 < n_params < 11_000  # tiny: 64-wide, vs 595,844 for NeRF
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((64, 32)).astype(np.float32)
    sh = nerf.sh_encoding(rng.standard_normal((64, 3)))
    out = ort_run(model, {"features": feats, "sh": sh})[0]
    ref = nerf.instant_ngp_forward(nerf.instant_ngp_init(4), feats, sh)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_sh_encoding_is_orthonormal() -> None:
    """The 16 real SH functions integrate to the identity over the sphere."""
    n_t, n_p = 100, 200
    theta = (np.arange(n_t) + 0.5) * np.pi / n_t
    phi = np.arange(n_p) * 2 * np.pi / n_p
    t, f = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(t) * np.cos(f), np.sin(t) * np.sin(f), np.cos(t)], -1).reshape(-1, 3)
    y = nerf.sh_encoding(dirs).astype(np.float64)
    w = (np.sin(t) * (np.pi / n_t) * (2 * np.pi / n_p)).ravel()
    np.testing.assert_allclose((y * w[:, None]).T @ y, np.eye(16), atol=2e-3)


def test_composite_closed_forms() -> None:
    z = np.linspace(2.0, 6.0, 64)
    color = np.array([0.2, 0.5, 0.9], np.float32)
    rgb = np.broadcast_to(color, (3, 64, 3))
    sigma = np.stack([np.zeros(64), np.full(64, 0.3), np.full(64, 50.0)])
    out = nerf.composite(rgb, sigma, z)
    np.testing.assert_allclose(out[0], 0.0)
    # The last sample has delta = 1e10, so any positive density ends opaque: weights sum to 1.
    np.testing.assert_allclose(out[1:], np.broadcast_to(color, (2, 3)), atol=1e-6)
    # One thin opaque sample: its colour alone.
    rgb2 = np.zeros((1, 64, 3), np.float32)
    rgb2[0, 10] = color
    sig2 = np.zeros((1, 64))
    sig2[0, 10] = 1e4
    np.testing.assert_allclose(nerf.composite(rgb2, sig2, z)[0], color, atol=1e-6)


def test_camera_rays_are_unit_and_centered() -> None:
    o, d = nerf.camera_rays(10, 10)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(o, axis=1), 4.0, atol=1e-5)
    centre = d.reshape(10, 10, 3)[4:6, 4:6].mean(axis=(0, 1))
    np.testing.assert_allclose(centre / np.linalg.norm(centre), -o[0] / 4.0, atol=1e-3)


def test_scene_render_has_objects_and_black_background() -> None:
    img = nerf.render_scene(height=24, width=24)
    assert img.shape == (24, 24, 3)
    assert img[0, 0].max() < 1e-3 and img[12, 12].max() > 0.2
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_bound_culling_matches_full_render() -> None:
    scene = nerf.Scene()
    o, d = nerf.camera_rays(12, 12)
    full = nerf.render(scene.query, o, d)
    culled = nerf.render(scene.query, o, d, bound=scene.bound)
    assert nerf.psnr(full, culled) > 45  # only the soft edges' far tails are cut


def test_trained_scene_nerf_renders_the_scene(ort_session, tmp_path) -> None:
    """Float onnxruntime render of the shipped scene NeRF (100x100, 64 samples, near 2, far 6)
    against the procedural ground truth; PNGs written."""
    params = nerf.scene_nerf_params()
    assert nerf.shape_of(params) == nerf.NeRFShape(8, 64, (4,))
    model = nerf.scene_nerf(batch=8192)
    onnx.checker.check_model(model, full_check=True)
    o, d = nerf.camera_rays(100, 100)
    img = nerf.render(nerf.session_query(ort_session(model)), o, d, bound=nerf.Scene().bound)
    img = img.reshape(100, 100, 3)
    truth = nerf.render_scene()
    p_truth = nerf.psnr(img, truth)
    print(f"scene NeRF float render PSNR vs ground truth: {p_truth:.2f} dB")
    assert p_truth >= 28.0
    for name, im in (("truth", truth), ("onnxruntime", img)):
        path = nerf.save_png(tmp_path / f"{name}.png", im)
        assert path.stat().st_size > 1000


def test_scene_nerf_session_query_matches_numpy(ort_session) -> None:
    """The render query through onnxruntime (chunked, last chunk padded) equals numpy."""
    params = nerf.scene_nerf_params()
    pts, dirs = nerf.ray_points(3000, seed=2)
    rgb, sigma = nerf.session_query(ort_session(nerf.scene_nerf(batch=1024)))(pts, dirs)
    rgb_ref, sigma_ref = nerf.mlp_query(params)(pts, dirs)
    np.testing.assert_allclose(rgb, rgb_ref, atol=1e-4)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-4, atol=1e-3)


def test_session_query_rejects_other_models(ort_session) -> None:
    from npu.models.cnn import moving_average

    with pytest.raises(ModelError, match="not a NeRF model"):
        nerf.session_query(ort_session(moving_average()))


@pytest.mark.parametrize("kwargs", [{"depth": 0}, {"width": 1}, {"skips": (7,)},
                                    {"batch": 0}])
def test_bad_nerf_arguments(kwargs) -> None:
    with pytest.raises(ModelError):
        nerf.nerf_mlp(**kwargs)
