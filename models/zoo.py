"""The model registry: every builder by name, with a description and calibration inputs.

    from npu.models.zoo import MODELS, calibration_data
    for name, entry in MODELS.items():
        model = entry()                      # an onnx.ModelProto with static shapes
        feeds = calibration_data(name, 8)    # 8 representative feed dicts for quantization

``MODELS[name]`` is a :class:`ZooEntry`: callable (it builds the model with the registry's
arguments) and carrying ``family`` ("cnn", "nerf", "gnn"), ``description`` and ``tags``
("light": an onnx model-zoo network; "large": over ~10 M parameters or 10,000 nodes, slow to
build or run in a simulator; "trained": weights trained here on real data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import cnn, gnn, light, nerf
from ._onnx import ModelError
from .data import digits_784, digits_split

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class ZooEntry:
    """A registered builder; calling it builds the model."""

    build: Callable[[], onnx.ModelProto]
    family: str
    description: str
    tags: frozenset[str] = field(default_factory=frozenset)

    def __call__(self) -> onnx.ModelProto:
        return self.build()


def _entry(build: Callable[[], onnx.ModelProto], family: str, description: str,
           *tags: str) -> ZooEntry:
    return ZooEntry(build, family, description, frozenset(tags))


#: Points per NeRF run in the registry's NeRF models (the seed's example batch).
NERF_BATCH = 1024

_LIGHT_DESCRIPTIONS = {
    "resnet50": "ResNet-50 (onnx light model, seeded weights)",
    "squeezenet": "SqueezeNet 1.0 (onnx light model, seeded weights)",
    "shufflenet": "ShuffleNet (onnx light model, seeded weights)",
    "inception_v1": "Inception v1 / GoogLeNet (onnx light model, seeded weights)",
    "inception_v2": "Inception v2 (onnx light model, seeded weights)",
    "densenet121": "DenseNet-121 (onnx light model, seeded weights)",
    "bvlc_alexnet": "AlexNet (onnx light model, seeded weights)",
    "vgg19": "VGG-19 (onnx light model, seeded weights)",
    "zfnet512": "ZFNet-512 (onnx light model, seeded weights)",
}
_LARGE_LIGHT = {"resnet50", "inception_v2", "bvlc_alexnet", "vgg19", "zfnet512"}


def _light(name: str) -> ZooEntry:
    tags = ("light", "large") if name in _LARGE_LIGHT else ("light",)
    return _entry(lambda: light.light_model(name), "cnn", _LIGHT_DESCRIPTIONS[name], *tags)


MODELS: dict[str, ZooEntry] = {
    "digits_cnn": _entry(lambda: cnn.digits_cnn(), "cnn",
                         "small CNN trained on sklearn digits, [1,1,8,8] -> logits", "trained"),
    "mlp_784": _entry(lambda: cnn.mlp_784(trained=True), "cnn",
                      "784-128-10 MLP with softmax, trained on digits upsampled to 28x28",
                      "trained"),
    "gaussian_blur": _entry(lambda: cnn.gaussian_blur(), "cnn",
                            "fixed 5x5 Gaussian blur, depthwise Conv on [1,3,32,32]"),
    "moving_average": _entry(lambda: cnn.moving_average(), "cnn",
                             "fixed 1-D moving average (k=5) Conv on [1,1,64]"),
    **{name: _light(name) for name in light.LIGHT_MODELS},
    "nerf": _entry(lambda: nerf.nerf_mlp(NERF_BATCH), "nerf",
                   "NeRF MLP as documented (8x256, skip, 63+27 encoded inputs), seeded"),
    "nerf_encoding": _entry(lambda: nerf.nerf_mlp(NERF_BATCH, encode_in_graph=True), "nerf",
                            "NeRF MLP as documented with Sin/Cos positional encoding in graph"),
    "nerf_scene": _entry(lambda: nerf.scene_nerf(NERF_BATCH), "nerf",
                         "NeRF MLP 8x64 trained on the procedural scene, raw xyz/dir inputs",
                         "trained"),
    "instant_ngp_mlp": _entry(lambda: nerf.instant_ngp_mlp(NERF_BATCH), "nerf",
                              "Instant-NGP tiny MLP (64 wide), hash features + SH inputs"),
    "gcn_karate": _entry(lambda: gnn.gcn("karate"), "gnn",
                         "2-layer GCN on karate club, trained", "trained"),
    "graphsage_karate": _entry(lambda: gnn.graphsage("karate"), "gnn",
                               "2-layer GraphSAGE-mean (fanouts 10, 5) on karate, trained",
                               "trained"),
    "gin_karate": _entry(lambda: gnn.gin("karate"), "gnn",
                         "2-layer GIN + linear head on karate club, trained", "trained"),
    "gcn_sbm": _entry(lambda: gnn.gcn("sbm"), "gnn",
                      "2-layer GCN on a 10,000-node block model (sparse constant adjacency)",
                      "large"),
    "graphsage_sbm": _entry(lambda: gnn.graphsage("sbm"), "gnn",
                            "2-layer GraphSAGE-mean (fanouts 10, 5) on a 10,000-node graph",
                            "large"),
    "gin_sbm": _entry(lambda: gnn.gin("sbm"), "gnn",
                      "2-layer GIN on a 10,000-node block model (sparse constant adjacency)",
                      "large"),
}


def _smooth_images(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    """Seeded smooth random images in [0, 1], [n, channels, size, size]."""
    from .data import upsample

    rng = np.random.default_rng(seed)
    small = rng.random((n, channels, max(2, size // 4), max(2, size // 4)))
    return np.clip(upsample(small, size), 0.0, 1.0).astype(np.float32)


def calibration_data(name: str, n: int = 8, seed: int = 0) -> list[Feeds]:
    """``n`` representative feed dicts for model ``name`` of :data:`MODELS` (its shapes).

    Real data where the model has it (digits, points on the scene's camera rays, the graph's
    node features), seeded smooth random images otherwise. GNN models have one real input
    (the whole graph), so all ``n`` feeds are that same input.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if n < 1:
        raise ModelError(f"n must be >= 1, got {n}")
    if name == "digits_cnn":
        x = digits_split().x_train[:n]
        return [{"image": x[i:i + 1]} for i in range(n)]
    if name == "mlp_784":
        x = digits_784(digits_split().x_train[:n])
        return [{"image": x[i:i + 1]} for i in range(n)]
    if name == "gaussian_blur":
        return [{"image": im[None]} for im in _smooth_images(n, 3, 32, seed)]
    if name == "moving_average":
        rng = np.random.default_rng(seed)
        walks = np.cumsum(rng.standard_normal((n, 1, 1, 64)), axis=-1).astype(np.float32)
        return [{"signal": w} for w in walks]
    if name in light.LIGHT_MODELS:
        key = light.light_input_name(name)
        return [{key: light.light_input(1, seed + i)} for i in range(n)]
    if name in ("nerf", "nerf_encoding", "nerf_scene"):
        pts, dirs = nerf.ray_points(n * NERF_BATCH, seed)
        feeds = []
        for i in range(n):
            p, d = (a[i * NERF_BATCH:(i + 1) * NERF_BATCH] for a in (pts, dirs))
            if name == "nerf":
                feeds.append({"x_enc": nerf.positional_encoding(p, nerf.L_POS),
                              "d_enc": nerf.positional_encoding(d, nerf.L_DIR)})
            else:
                feeds.append({"xyz": p, "viewdir": d})
        return feeds
    if name == "instant_ngp_mlp":
        rng = np.random.default_rng(seed)
        pts, dirs = nerf.ray_points(n * NERF_BATCH, seed)
        return [{"features": (0.5 * rng.standard_normal((NERF_BATCH, 32))).astype(np.float32),
                 "sh": nerf.sh_encoding(dirs[i * NERF_BATCH:(i + 1) * NERF_BATCH])}
                for i in range(n)]
    if MODELS[name].family == "gnn":
        kind, graph = name.split("_")
        feeds = gnn.gnn_feeds({"graphsage": "sage"}.get(kind, kind), graph)
        return [dict(feeds) for _ in range(n)]
    raise ModelError(f"no calibration data for {name!r}")  # a registry entry without a case
