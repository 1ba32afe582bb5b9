"""NeRF MLPs, the Instant-NGP tiny MLP, a procedural scene and a host-side volume renderer.

The network is the seed's ``NeRF(depth=8, width=256, input_ch=63, input_ch_views=27)``
(see ``../shared/models-from-seeds.md`` section 1), layer for layer::

    h = x_enc                                              x_enc [N, 63] = gamma(xyz), L = 10
    for i in 0..7: h = relu(h @ W_i + b_i);  if i == 4: h = concat([x_enc, h])   (skip)
    alpha = h @ W_alpha (256 -> 1);  feature = h @ W_feat (256 -> 256)
    h = relu(concat([feature, d_enc]) @ W_view + b)        d_enc [N, 27] = gamma(dir), L = 4
    rgb = h @ W_rgb (128 -> 3);  raw = concat([rgb, alpha])   [N, 4], no output activation

The renderer applies ``sigmoid`` to rgb and ``relu`` to the density (as the seed code does);
``activations=True`` puts those into the graph instead. Positional encoding follows the seed
formula ``gamma(p) = [p, sin(2^0 pi p), cos(2^0 pi p), ..., sin(2^(L-1) pi p), cos(...)]`` with
the raw coordinate first (3 + 3*2*L inputs: 63 and 27), per frequency sin of x, y, z then cos.

Builders (all return ``onnx.ModelProto``, opset 17, static batch ``batch`` = sample points):

* :func:`nerf_mlp` with ``encode_in_graph=False``: inputs ``x_enc`` [B, 63], ``d_enc`` [B, 27];
  with ``encode_in_graph=True``: inputs ``xyz`` [B, 3], ``viewdir`` [B, 3] and the encoding as
  Unsqueeze/Mul/Sin/Cos/Concat/Reshape nodes. Output ``raw`` [B, 4] (``rgb_sigma`` with
  activations).
* :func:`instant_ngp_mlp`: inputs ``features`` [B, 32] (hash-grid features, 16 levels x 2) and
  ``sh`` [B, 16] (degree-4 spherical harmonics of the direction); output ``raw`` [B, 4].

Rendering: :func:`camera_rays`, :func:`render` (64 samples, near 2, far 6, uniform t as in the
seed), :func:`psnr`, :func:`save_png`; the scene: :class:`Scene`; a NeRF trained here on it:
:func:`scene_nerf` (weights shipped in ``data/nerf_scene.npz``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import onnx

from ._nn import Adam, sigmoid, single_threaded
from ._onnx import GraphBuilder, ModelError, check_positive, he_normal

Params = dict[str, np.ndarray]

#: The seed's renderer: samples per ray and the depth range.
N_SAMPLES, NEAR, FAR = 64, 2.0, 6.0
#: Positional-encoding frequencies (seed: L=10 for position, L=4 for direction).
L_POS, L_DIR = 10, 4
#: File with the trained scene NeRF (float16); ``python -m npu.models.train nerf`` writes it.
NERF_SCENE_FILE = "nerf_scene.npz"


# ------------------------------------------------------------------------------------------
# Positional encoding and the MLP in numpy

def encoded_size(n_freqs: int) -> int:
    """Width of gamma(p) for a 3-vector p: 3 + 3 * 2 * L (63 for L=10, 27 for L=4)."""
    return 3 + 6 * n_freqs


def positional_encoding(p: np.ndarray, n_freqs: int) -> np.ndarray:
    """gamma(p) of [N, 3] points: [p, sin(2^0 pi p), cos(2^0 pi p), ...] -> [N, 3 + 6L]."""
    p = np.asarray(p, dtype=np.float32)
    freqs = (2.0 ** np.arange(n_freqs) * np.pi).astype(np.float32)
    s = p[:, None, :] * freqs[None, :, None]  # [N, L, 3]
    sc = np.concatenate([np.sin(s), np.cos(s)], axis=2)  # [N, L, 6]: sin xyz, cos xyz
    return np.concatenate([p, sc.reshape(len(p), -1)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class NeRFShape:
    """Sizes of a NeRF MLP. The defaults are the documented network."""

    depth: int = 8
    width: int = 256
    skips: tuple[int, ...] = (4,)
    l_pos: int = L_POS
    l_dir: int = L_DIR

    def __post_init__(self) -> None:
        check_positive(depth=self.depth, width=self.width, l_pos=self.l_pos, l_dir=self.l_dir)
        if self.width < 2:
            raise ModelError(f"width must be >= 2 (the view branch is width // 2), "
                             f"got {self.width}")
        bad = [s for s in self.skips if not 0 <= s < self.depth - 1]
        if bad:
            raise ModelError(f"skips {bad} must name layers 0..{self.depth - 2} "
                             f"(the input is concatenated after them)")

    @property
    def in_pos(self) -> int:
        return encoded_size(self.l_pos)

    @property
    def in_dir(self) -> int:
        return encoded_size(self.l_dir)

    def layer_inputs(self, i: int) -> int:
        """Input width of position layer ``i``."""
        if i == 0:
            return self.in_pos
        return self.width + (self.in_pos if i - 1 in self.skips else 0)

    def param_shapes(self) -> dict[str, tuple[int, int]]:
        """[in, out] of every layer, in the seed's order and names."""
        w = self.width
        shapes = {f"pts.{i}": (self.layer_inputs(i), w) for i in range(self.depth)}
        shapes.update({"alpha": (w, 1), "feature": (w, w), "views.0": (w + self.in_dir, w // 2),
                       "rgb": (w // 2, 3)})
        return shapes

    def macs_per_point(self) -> int:
        """Multiply-accumulates per sample point (593,408 for the documented network)."""
        return sum(a * b for a, b in self.param_shapes().values())

    def n_params(self) -> int:
        """Weights + biases (595,844 for the documented network)."""
        return sum(a * b + b for a, b in self.param_shapes().values())


def nerf_init(shape: NeRFShape = NeRFShape(), seed: int = 0) -> Params:
    """Seeded He-init parameters (``<layer>.weight`` [in, out], ``<layer>.bias`` [out])."""
    rng = np.random.default_rng(seed)
    p: Params = {}
    for name, (fan_in, fan_out) in shape.param_shapes().items():
        gain = 1.0 if name in ("alpha", "feature", "rgb") else 2.0  # no ReLU after these
        p[f"{name}.weight"] = he_normal(rng, fan_in, (fan_in, fan_out), gain)
        p[f"{name}.bias"] = np.zeros(fan_out, np.float32)
    if "alpha.bias" in p:
        p["alpha.bias"][:] = 0.1  # a little density everywhere, so relu(sigma) is alive
    return p


def shape_of(p: Params) -> NeRFShape:
    """The :class:`NeRFShape` that parameters ``p`` belong to (for stored weights)."""
    depth = sum(1 for k in p if k.startswith("pts.") and k.endswith(".weight"))
    width = p["pts.0.weight"].shape[1]
    in_pos = p["pts.0.weight"].shape[0]
    in_dir = p["views.0.weight"].shape[0] - width
    skips = tuple(i - 1 for i in range(1, depth) if p[f"pts.{i}.weight"].shape[0] != width)
    return NeRFShape(depth, width, skips, (in_pos - 3) // 6, (in_dir - 3) // 6)


def nerf_forward(p: Params, x_enc: np.ndarray, d_enc: np.ndarray,
                 cache: list | None = None) -> np.ndarray:
    """numpy NeRF forward: encoded inputs [N, 63], [N, 27] -> raw [N, 4] (rgb, sigma)."""
    shape = shape_of(p)
    h = x_enc
    for i in range(shape.depth):
        z = h @ p[f"pts.{i}.weight"] + p[f"pts.{i}.bias"]
        if cache is not None:
            cache.append((h, z))
        h = np.maximum(z, 0)
        if i in shape.skips:
            h = np.concatenate([x_enc, h], axis=1)
    alpha = h @ p["alpha.weight"] + p["alpha.bias"]
    feat = h @ p["feature.weight"] + p["feature.bias"]
    hv = np.concatenate([feat, d_enc], axis=1)
    zv = hv @ p["views.0.weight"] + p["views.0.bias"]
    av = np.maximum(zv, 0)
    rgb = av @ p["rgb.weight"] + p["rgb.bias"]
    if cache is not None:
        cache.append((h, hv, zv, av))
    return np.concatenate([rgb, alpha], axis=1)


def _nerf_backward(p: Params, cache: list, draw: np.ndarray) -> Params:
    shape = shape_of(p)
    h, hv, zv, av = cache[-1]
    g: Params = {}
    drgb, dalpha = draw[:, :3], draw[:, 3:]
    g["rgb.weight"], g["rgb.bias"] = av.T @ drgb, drgb.sum(0)
    dzv = (drgb @ p["rgb.weight"].T) * (zv > 0)
    g["views.0.weight"], g["views.0.bias"] = hv.T @ dzv, dzv.sum(0)
    dfeat = (dzv @ p["views.0.weight"].T)[:, :shape.width]
    g["feature.weight"], g["feature.bias"] = h.T @ dfeat, dfeat.sum(0)
    g["alpha.weight"], g["alpha.bias"] = h.T @ dalpha, dalpha.sum(0)
    dh = dfeat @ p["feature.weight"].T + dalpha @ p["alpha.weight"].T
    for i in reversed(range(shape.depth)):
        if i in shape.skips:
            dh = dh[:, shape.in_pos:]  # the x_enc part needs no gradient
        hin, z = cache[i]
        dz = dh * (z > 0)
        g[f"pts.{i}.weight"], g[f"pts.{i}.bias"] = hin.T @ dz, dz.sum(0)
        if i:
            dh = dz @ p[f"pts.{i}.weight"].T
    return g


# ------------------------------------------------------------------------------------------
# ONNX builders

def _encode_nodes(g: GraphBuilder, x: str, n_freqs: int, batch: int, hint: str) -> str:
    """gamma(x) in the graph: Unsqueeze, Mul by 2^k pi, Sin, Cos, Concat, Reshape, Concat."""
    u = g.node("Unsqueeze", [x, g.const(f"{hint}.axes", np.array([1], np.int64))],
               f"{hint}_unsq")  # [B, 1, 3]
    freqs = (2.0 ** np.arange(n_freqs) * np.pi).astype(np.float32).reshape(1, n_freqs, 1)
    s = g.node("Mul", [u, g.const(f"{hint}.freqs", freqs)], f"{hint}_scaled")  # [B, L, 3]
    sc = g.node("Concat", [g.node("Sin", [s], f"{hint}_sin"), g.node("Cos", [s], f"{hint}_cos")],
                f"{hint}_sincos", axis=2)  # [B, L, 6]
    flat = g.node("Reshape", [sc, g.const(f"{hint}.shape",
                                          np.array([batch, 6 * n_freqs], np.int64))],
                  f"{hint}_flat")
    return g.node("Concat", [x, flat], f"{hint}_enc", axis=1)


def nerf_mlp(batch: int = 1024, depth: int = 8, width: int = 256, skips: Sequence[int] = (4,),
             seed: int = 0, params: Params | None = None, encode_in_graph: bool = False,
             activations: bool = False) -> onnx.ModelProto:
    """The NeRF MLP as documented (defaults: 8 x 256, skip after layer 4, 595,844 parameters).

    ``batch`` is the number of sample points per run (the seed's example uses 1024).
    ``params`` (e.g. :func:`scene_nerf_params`) overrides depth/width/skips and ``seed``.
    Inputs ``x_enc`` [B, 63] and ``d_enc`` [B, 27], or with ``encode_in_graph`` ``xyz`` [B, 3]
    and ``viewdir`` [B, 3] (Sin/Cos nodes make the encoding). Output ``raw`` [B, 4] = (rgb
    logits, density logit); with ``activations`` the output is ``rgb_sigma`` = (sigmoid(rgb),
    relu(density)).
    """
    check_positive(batch=batch)
    shape = shape_of(params) if params is not None else NeRFShape(depth, width, tuple(skips))
    p = params if params is not None else nerf_init(shape, seed)
    g = GraphBuilder("nerf_mlp")
    if encode_in_graph:
        x_enc = _encode_nodes(g, g.input("xyz", [batch, 3]), shape.l_pos, batch, "pos")
        d_enc = _encode_nodes(g, g.input("viewdir", [batch, 3]), shape.l_dir, batch, "dir")
    else:
        x_enc = g.input("x_enc", [batch, shape.in_pos])
        d_enc = g.input("d_enc", [batch, shape.in_dir])
    h = x_enc
    for i in range(shape.depth):
        h = g.node("Relu", [g.gemm(h, p[f"pts.{i}.weight"], p[f"pts.{i}.bias"], f"pts.{i}")],
                   f"pts.{i}.relu")
        if i in shape.skips:
            h = g.node("Concat", [x_enc, h], f"skip{i}", axis=1)
    alpha = g.gemm(h, p["alpha.weight"], p["alpha.bias"], "alpha")
    feat = g.gemm(h, p["feature.weight"], p["feature.bias"], "feature")
    hv = g.node("Concat", [feat, d_enc], "views_in", axis=1)
    hv = g.node("Relu", [g.gemm(hv, p["views.0.weight"], p["views.0.bias"], "views.0")],
                "views.0.relu")
    rgb = g.gemm(hv, p["rgb.weight"], p["rgb.bias"], "rgb")
    if activations:
        g.node("Concat", [g.node("Sigmoid", [rgb], "rgb_act"), g.node("Relu", [alpha],
                                                                     "sigma_act")],
               out="rgb_sigma", axis=1)
        g.output("rgb_sigma", [batch, 4])
    else:
        g.node("Concat", [rgb, alpha], out="raw", axis=1)
        g.output("raw", [batch, 4])
    return g.build(f"NeRF MLP depth={shape.depth} width={shape.width} skips={shape.skips}")


def instant_ngp_init(seed: int = 0, n_inputs: int = 32, width: int = 64, geo: int = 16,
                     n_sh: int = 16) -> Params:
    """Seeded parameters of the Instant-NGP tiny MLPs (density: 1 hidden, colour: 2 hidden)."""
    rng = np.random.default_rng(seed)
    shapes = {"density.0": (n_inputs, width), "density.1": (width, geo),
              "color.0": (geo + n_sh, width), "color.1": (width, width), "color.2": (width, 3)}
    p: Params = {}
    for name, (a, b) in shapes.items():
        p[f"{name}.weight"] = he_normal(rng, a, (a, b), 1.0 if name.endswith((".1", ".2"))
                                        and name != "color.1" else 2.0)
        p[f"{name}.bias"] = np.zeros(b, np.float32)
    return p


def instant_ngp_forward(p: Params, features: np.ndarray, sh: np.ndarray) -> np.ndarray:
    """numpy forward of :func:`instant_ngp_mlp`: -> raw [N, 4] (rgb logits, density logit)."""
    geo = np.maximum(features @ p["density.0.weight"] + p["density.0.bias"], 0)
    geo = geo @ p["density.1.weight"] + p["density.1.bias"]
    h = np.concatenate([geo, sh], axis=1)
    for i in (0, 1):
        h = np.maximum(h @ p[f"color.{i}.weight"] + p[f"color.{i}.bias"], 0)
    rgb = h @ p["color.2.weight"] + p["color.2.bias"]
    return np.concatenate([rgb, geo[:, :1]], axis=1)


def instant_ngp_mlp(batch: int = 4096, width: int = 64, n_levels: int = 16,
                    n_features: int = 2, seed: int = 0, params: Params | None = None
                    ) -> onnx.ModelProto:
    """The Instant-NGP-sized tiny MLP (64 wide), with seeded weights.

    Density MLP: ``features`` [B, n_levels * n_features] (the multiresolution hash-grid
    features, looked up and interpolated on the host) -> Gemm 64, Relu -> Gemm 16 = ``geo``
    (geo[:, 0] is the density logit). Colour MLP: Concat(geo, ``sh`` [B, 16]) -> Gemm 64, Relu
    -> Gemm 64, Relu -> Gemm 3. Output ``raw`` [B, 4] = Concat(rgb, Slice(geo, 0:1)).
    """
    check_positive(batch=batch, width=width, n_levels=n_levels, n_features=n_features)
    p = params if params is not None else instant_ngp_init(seed, n_levels * n_features, width)
    n_in = p["density.0.weight"].shape[0]
    g = GraphBuilder("instant_ngp_mlp")
    x = g.input("features", [batch, n_in])
    sh = g.input("sh", [batch, p["color.0.weight"].shape[0] - p["density.1.weight"].shape[1]])
    h = g.node("Relu", [g.gemm(x, p["density.0.weight"], p["density.0.bias"], "density.0")])
    geo = g.gemm(h, p["density.1.weight"], p["density.1.bias"], "density.1")
    h = g.node("Concat", [geo, sh], "color_in", axis=1)
    for i in (0, 1):
        h = g.node("Relu", [g.gemm(h, p[f"color.{i}.weight"], p[f"color.{i}.bias"],
                                   f"color.{i}")])
    rgb = g.gemm(h, p["color.2.weight"], p["color.2.bias"], "color.2")
    sigma = g.node("Slice", [geo, g.const("zero", np.array([0], np.int64)),
                             g.const("one", np.array([1], np.int64)),
                             g.const("axis1", np.array([1], np.int64))], "sigma")
    g.node("Concat", [rgb, sigma], out="raw", axis=1)
    g.output("raw", [batch, 4])
    return g.build("Instant-NGP tiny MLP (hash-grid features and SH directions from the host)")


def sh_encoding(dirs: np.ndarray) -> np.ndarray:
    """Real spherical harmonics up to degree 4 (16 coefficients) of unit directions [N, 3]."""
    d = np.asarray(dirs, dtype=np.float64)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    xx, yy, zz = x * x, y * y, z * z
    out = [
        np.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y, 0.48860251190291987 * z, -0.48860251190291987 * x,
        1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
        0.94617469575755997 * zz - 0.31539156525251999, -1.0925484305920792 * x * z,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy), 2.8906114426405538 * x * y * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz), 0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz), 1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ]
    return np.stack(out, axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------
# The procedural scene

@dataclass(frozen=True)
class Shape3D:
    """A sphere (``half`` = None) or an axis-aligned box, with a colour."""

    center: tuple[float, float, float]
    color: tuple[float, float, float]
    radius: float = 0.0
    half: tuple[float, float, float] | None = None

    def sdf(self, p: np.ndarray) -> np.ndarray:
        """Signed distance of points [N, 3] (negative inside)."""
        q = p - np.asarray(self.center)
        if self.half is None:
            return np.linalg.norm(q, axis=1) - self.radius
        d = np.abs(q) - np.asarray(self.half)
        outside = np.linalg.norm(np.maximum(d, 0), axis=1)
        return outside + np.minimum(d.max(axis=1), 0)


@dataclass(frozen=True)
class Scene:
    """A few coloured shapes as a smooth density + colour field (no training data needed).

    density = sigma_max * sigmoid(-sdf / edge) per shape (summed): solid inside, a soft edge of
    a few hundredths of a unit, zero far away; colour = density-weighted mix of the shapes'
    colours, shaded by how much the surface faces the viewer (view dependent, so the view
    branch has work to do). Everything lies inside the sphere of radius :attr:`bound`.
    """

    shapes: tuple[Shape3D, ...] = field(default_factory=lambda: (
        Shape3D((-0.45, -0.35, 0.0), (0.9, 0.2, 0.15), radius=0.45),
        Shape3D((0.5, 0.3, 0.1), (0.2, 0.75, 0.25), radius=0.4),
        Shape3D((0.0, 0.45, -0.45), (0.2, 0.35, 0.9), half=(0.3, 0.3, 0.22)),
        Shape3D((0.1, -0.2, -0.72), (0.9, 0.8, 0.3), half=(0.75, 0.75, 0.06)),
    ))
    sigma_max: float = 40.0
    edge: float = 0.03
    bound: float = 1.35

    def density(self, p: np.ndarray) -> np.ndarray:
        """Per-shape density [N, n_shapes]."""
        sdf = np.stack([s.sdf(p) for s in self.shapes], axis=1)
        return self.sigma_max * sigmoid(-sdf / self.edge)

    def normal(self, p: np.ndarray) -> np.ndarray:
        """Unit gradient of the smoothed union's SDF (central differences)."""
        eps = 1e-3
        grad = np.zeros_like(p)
        for k in range(3):
            dp = np.zeros(3)
            dp[k] = eps
            grad[:, k] = self._union_sdf(p + dp) - self._union_sdf(p - dp)
        return grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-9)

    def _union_sdf(self, p: np.ndarray) -> np.ndarray:
        return np.min(np.stack([s.sdf(p) for s in self.shapes], axis=1), axis=1)

    def query(self, p: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rgb [N, 3] in [0, 1], sigma [N] >= 0) at points ``p`` seen along directions ``d``."""
        p = np.asarray(p, dtype=np.float64)
        dens = self.density(p)
        sigma = dens.sum(axis=1)
        base = (dens @ np.asarray([s.color for s in self.shapes])) / (sigma[:, None] + 1e-9)
        facing = np.clip(-np.sum(self.normal(p) * d, axis=1), 0.0, 1.0)
        rgb = base * (0.45 + 0.55 * facing[:, None])
        return rgb.astype(np.float32), sigma.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Cameras and volume rendering

def look_at(eye: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world [3, 4] (columns right, up, back, position; looking down -z)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(back, right), back, eye], axis=1)


def orbit_camera(azimuth_deg: float, elevation_deg: float, radius: float = 4.0) -> np.ndarray:
    """Camera-to-world of a camera on a sphere around the origin, looking at it."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    eye = radius * np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    return look_at(eye)


#: The view the accuracy checks and the demo render.
DEFAULT_VIEW = (35.0, 30.0)


def camera_rays(height: int = 100, width: int = 100, c2w: np.ndarray | None = None,
                fov_deg: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole rays through pixel centres: origins and unit directions, each [H*W, 3]."""
    check_positive(height=height, width=width)
    c2w = orbit_camera(*DEFAULT_VIEW) if c2w is None else np.asarray(c2w)
    focal = 0.5 * width / np.tan(0.5 * np.radians(fov_deg))
    j, i = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    cam = np.stack([(i - 0.5 * width) / focal, -(j - 0.5 * height) / focal,
                    -np.ones_like(i)], axis=-1).reshape(-1, 3)
    dirs = cam @ c2w[:, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(c2w[:, 3], dirs.shape)
    return origins.astype(np.float32), dirs.astype(np.float32)


def sample_points(origins: np.ndarray, dirs: np.ndarray, n_samples: int = N_SAMPLES,
                  near: float = NEAR, far: float = FAR) -> tuple[np.ndarray, np.ndarray]:
    """The seed's uniform samples: z [S] and points [R, S, 3] = o + d * z."""
    t = np.linspace(0.0, 1.0, n_samples)
    z = near * (1.0 - t) + far * t
    pts = origins[:, None, :] + dirs[:, None, :] * z[None, :, None]
    return z.astype(np.float32), pts.astype(np.float32)


def composite(rgb: np.ndarray, sigma: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Alpha compositing of [R, S, 3] colours and [R, S] densities -> [R, 3] (black background).

    delta_i = z_{i+1} - z_i (last 1e10), alpha = 1 - exp(-sigma delta),
    w = alpha * cumprod([1, 1 - alpha + 1e-10])[:-1] (exclusive), rgb_map = sum w rgb.
    """
    delta = np.append(np.diff(z), 1e10).astype(np.float64)
    alpha = 1.0 - np.exp(-sigma.astype(np.float64) * delta)
    trans = np.cumprod(np.concatenate([np.ones((len(alpha), 1)), 1.0 - alpha + 1e-10], axis=1),
                       axis=1)[:, :-1]
    weights = alpha * trans
    return np.sum(weights[..., None] * rgb, axis=1).astype(np.float32)


QueryFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def render(query: QueryFn, origins: np.ndarray, dirs: np.ndarray, n_samples: int = N_SAMPLES,
           near: float = NEAR, far: float = FAR, bound: float | None = None) -> np.ndarray:
    """Volume-render rays with ``query(points [N, 3], dirs [N, 3]) -> (rgb [N, 3], sigma [N])``.

    ``bound``: only points inside the sphere of that radius are queried (density 0 outside,
    true of the procedural scene), which skips most empty samples; None queries every sample.
    Returns [R, 3] colours.
    """
    z, pts = sample_points(origins, dirs, n_samples, near, far)
    r, s = pts.shape[:2]
    flat = pts.reshape(-1, 3)
    flat_dirs = np.repeat(dirs, s, axis=0)
    rgb = np.zeros((r * s, 3), np.float32)
    sigma = np.zeros(r * s, np.float32)
    keep = (np.ones(r * s, bool) if bound is None
            else np.sum(flat * flat, axis=1) <= bound * bound)
    if keep.any():
        rgb[keep], sigma[keep] = query(flat[keep], flat_dirs[keep])
    return composite(rgb.reshape(r, s, 3), sigma.reshape(r, s), z)


def raw_to_rgb_sigma(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seed renderer's output activations: (sigmoid(raw[:, :3]), relu(raw[:, 3]))."""
    raw = np.asarray(raw, dtype=np.float32)
    return sigmoid(raw[:, :3]), np.maximum(raw[:, 3], 0.0)


def mlp_query(p: Params) -> QueryFn:
    """A render query running :func:`nerf_forward` in numpy (the float reference)."""
    shape = shape_of(p)

    def query(pts: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = nerf_forward(p, positional_encoding(pts, shape.l_pos),
                           positional_encoding(dirs, shape.l_dir))
        return raw_to_rgb_sigma(raw)

    return query


def session_query(session, batch: int | None = None) -> QueryFn:
    """A render query through any session with onnxruntime's API (``get_inputs``, ``run``).

    Works for a NeRF model with encoded inputs (``x_enc``/``d_enc``: encoded here) or raw
    ones (``xyz``/``viewdir``), and for an output that is ``raw`` or ``rgb_sigma``. Points go
    in chunks of the model's static batch, the last one padded.
    """
    inputs = [i.name for i in session.get_inputs()]
    out = session.get_outputs()[0].name
    if batch is None:
        batch = session.get_inputs()[0].shape[0]
        if not isinstance(batch, int):
            raise ModelError("the model's batch dimension is symbolic: pass batch=")
    encoded = "x_enc" in inputs
    if not encoded and set(inputs) != {"xyz", "viewdir"}:
        raise ModelError(f"not a NeRF model: inputs {inputs}")
    l_pos = (session.get_inputs()[inputs.index("x_enc")].shape[1] - 3) // 6 if encoded else 0
    l_dir = (session.get_inputs()[inputs.index("d_enc")].shape[1] - 3) // 6 if encoded else 0

    def query(pts: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(pts)
        raws = []
        for i in range(0, n, batch):
            a, b = pts[i:i + batch], dirs[i:i + batch]
            pad = batch - len(a)
            if pad:
                a = np.concatenate([a, np.zeros((pad, 3), np.float32)])
                b = np.concatenate([b, np.tile(b[-1:], (pad, 1))])
            feeds = ({"x_enc": positional_encoding(a, l_pos),
                      "d_enc": positional_encoding(b, l_dir)} if encoded
                     else {"xyz": a.astype(np.float32), "viewdir": b.astype(np.float32)})
            raws.append(session.run([out], feeds)[0][:batch - pad])
        raw = np.concatenate(raws)
        if out == "rgb_sigma":
            return raw[:, :3], raw[:, 3]
        return raw_to_rgb_sigma(raw)

    return query


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, peak] (inf when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an [H, W, 3] (or [H*W, 3] square) image in [0, 1] as PNG with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        side = int(round(np.sqrt(len(img))))
        img = img.reshape(side, side, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.clip(img, 0.0, 1.0))
    return path


def render_scene(scene: Scene | None = None, height: int = 100, width: int = 100,
                 view: tuple[float, float] = DEFAULT_VIEW) -> np.ndarray:
    """Ground-truth render of the procedural scene, [H, W, 3]."""
    scene = scene or Scene()
    o, d = camera_rays(height, width, orbit_camera(*view))
    return render(scene.query, o, d, bound=scene.bound).reshape(height, width, 3)


# ------------------------------------------------------------------------------------------
# Training a NeRF on the procedural scene (field regression on points along camera rays)

#: Size and schedule of the shipped scene NeRF (reduced width: it renders 100x100 views
#: through the cycle-level simulator in the test suite).
TRAINED_CONFIG = {"depth": 8, "width": 64, "skips": (4,), "steps": 3000, "batch": 4096,
                  "lr": 3e-3, "seed": 0}


def ray_points(n: int, seed: int = 0, bound: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sample points and their ray directions, each [n, 3], as the renderer queries them.

    Rays of random orbit cameras (radius 4, looking at the origin), depths uniform in
    [near, far]; only points inside the sphere of radius ``bound`` (default the scene's).
    Training data and calibration data for the NeRF models.
    """
    return _training_points(Scene(bound=bound or Scene().bound), np.random.default_rng(seed), n)


def _training_points(scene: Scene, rng: np.random.Generator, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Points on random camera rays (random orbit views, jittered samples) inside the bound."""
    pts_all, dirs_all = [], []
    total = 0
    while total < n:
        c2w = orbit_camera(rng.uniform(0, 360), rng.uniform(-10, 70))
        o, d = camera_rays(32, 32, c2w)
        z = rng.uniform(NEAR, FAR, size=(len(o), 16))
        pts = (o[:, None] + d[:, None] * z[..., None]).reshape(-1, 3)
        dirs = np.repeat(d, 16, axis=0)
        keep = np.sum(pts * pts, axis=1) <= scene.bound ** 2
        pts_all.append(pts[keep])
        dirs_all.append(dirs[keep])
        total += int(keep.sum())
    return (np.concatenate(pts_all)[:n].astype(np.float32),
            np.concatenate(dirs_all)[:n].astype(np.float32))


@single_threaded
def train_scene_nerf(depth: int = 8, width: int = 64, skips: Sequence[int] = (4,),
                     steps: int = 3000, batch: int = 4096, lr: float = 3e-3, seed: int = 0,
                     scene: Scene | None = None, verbose: bool = False) -> Params:
    """Fit a NeRF MLP to the scene's density and colour (Adam, cosine learning-rate decay).

    Loss per point, as the renderer sees it: (alpha(sigma_pred) - alpha(sigma))^2 with
    alpha = 1 - exp(-sigma * delta) at the render's sample spacing, plus alpha-weighted squared
    colour error. The ReLU on the density passes a small gradient below 0 during training so
    no point gets stuck empty.
    """
    scene = scene or Scene()
    shape = NeRFShape(depth, width, tuple(skips))
    p = nerf_init(shape, seed)
    opt = Adam(p, lr=lr)
    rng = np.random.default_rng(seed + 1)
    delta = (FAR - NEAR) / (N_SAMPLES - 1)
    pool_pts, pool_dirs = _training_points(scene, rng, 400_000)
    pool_rgb, pool_sigma = scene.query(pool_pts, pool_dirs)
    pool_alpha = 1.0 - np.exp(-pool_sigma * delta)
    for step in range(steps):
        idx = rng.integers(0, len(pool_pts), batch)
        pts, dirs = pool_pts[idx], pool_dirs[idx]
        cache: list = []
        raw = nerf_forward(p, positional_encoding(pts, shape.l_pos),
                           positional_encoding(dirs, shape.l_dir), cache)
        rgb = sigmoid(raw[:, :3])
        sig = np.maximum(raw[:, 3], 0)
        alpha = 1.0 - np.exp(-sig * delta)
        a_gt = pool_alpha[idx]
        w = a_gt + 0.05
        e_a = alpha - a_gt
        e_c = rgb - pool_rgb[idx]
        loss = float(np.mean(e_a ** 2) + np.mean(w[:, None] * e_c ** 2))
        draw = np.empty_like(raw)
        dsig = 2 * e_a * (1.0 - alpha) * delta / batch
        draw[:, 3] = dsig * np.where(raw[:, 3] > 0, 1.0, 0.01)
        draw[:, :3] = 2 * w[:, None] * e_c * rgb * (1 - rgb) / (batch * 3)
        g = _nerf_backward(p, cache, draw.astype(np.float32))
        opt.step(g, lr=lr * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * step / steps))))
        if verbose and (step % 250 == 0 or step == steps - 1):
            print(f"step {step:5d} loss {loss:.5f}")
    return p


def save_nerf_params(path: str | Path, p: Params) -> None:
    """Write NeRF parameters as float16 (the shipped file)."""
    np.savez_compressed(path, **{k: v.astype(np.float16) for k, v in p.items()})


@lru_cache(maxsize=1)
def scene_nerf_params() -> Params:
    """The shipped NeRF trained on :class:`Scene` (8 x 64, skip after layer 4), float32."""
    with resources.files("npu.models").joinpath("data", NERF_SCENE_FILE).open("rb") as f:
        with np.load(f) as z:
            return {k: z[k].astype(np.float32) for k in z.files}


def scene_nerf(batch: int = 1024, encode_in_graph: bool = True, activations: bool = False
               ) -> onnx.ModelProto:
    """The NeRF MLP trained on the procedural scene (see :func:`nerf_mlp` for inputs/outputs;
    by default raw ``xyz``/``viewdir`` inputs with the encoding in the graph)."""
    return nerf_mlp(batch, params=scene_nerf_params(), encode_in_graph=encode_in_graph,
                    activations=activations)
