"""CNN-family builders: the digits CNN, the 784-128-10 MLP and the fixed-weight filters.

Every builder returns an ``onnx.ModelProto`` (opset 17) with static shapes; the batch size is an
argument. Weights are stored as [in, out] for Gemm and [out, in/group, kh, kw] for Conv.

=====================  ==================================  =================================
builder                inputs                               outputs
=====================  ==================================  =================================
``digits_cnn``         ``image`` [B, 1, 8, 8] in [0, 1]     ``logits`` [B, 10] (or ``probs``)
``mlp_784``            ``image`` [B, 784]                   ``probs`` [B, 10] (or ``logits``)
``gaussian_blur``      ``image`` [B, C, H, W]               ``blurred`` [B, C, H, W]
``moving_average``     ``signal`` [B, 1, L]                 ``smoothed`` [B, 1, L - k + 1]
=====================  ==================================  =================================
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np
import onnx

from ._nn import Adam, col2im, cross_entropy, im2col, single_threaded
from ._onnx import GraphBuilder, ModelError, check_positive, he_normal
from .data import accuracy, digits_784, digits_split

Params = dict[str, np.ndarray]

#: File (in ``npu/models/data``) with the trained digits CNN; ``python -m npu.models.train``
#: writes it.
DIGITS_CNN_FILE = "digits_cnn.npz"


# ------------------------------------------------------------------------------------------
# Digits CNN: conv3x3(1->16) relu, conv3x3(16->32) relu, maxpool2, fc(512->64) relu, fc(64->10)

def digits_cnn_init(seed: int = 0, c1: int = 16, c2: int = 32, hidden: int = 64) -> Params:
    """He-initialised parameters of the digits CNN (untrained)."""
    rng = np.random.default_rng(seed)
    flat = c2 * 4 * 4
    return {
        "conv1.weight": he_normal(rng, 9, (c1, 1, 3, 3)), "conv1.bias": np.zeros(c1, np.float32),
        "conv2.weight": he_normal(rng, 9 * c1, (c2, c1, 3, 3)),
        "conv2.bias": np.zeros(c2, np.float32),
        "fc1.weight": he_normal(rng, flat, (flat, hidden)),
        "fc1.bias": np.zeros(hidden, np.float32),
        "fc2.weight": he_normal(rng, hidden, (hidden, 10), gain=1.0),
        "fc2.bias": np.zeros(10, np.float32),
    }


def digits_cnn_forward(p: Params, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
    """numpy forward pass of the digits CNN: [N, 1, 8, 8] -> logits [N, 10]."""
    n = len(x)
    c1, c2 = len(p["conv1.bias"]), len(p["conv2.bias"])
    cols1 = im2col(x, 3, 1)
    z1 = cols1 @ p["conv1.weight"].reshape(c1, -1).T + p["conv1.bias"]
    a1 = np.maximum(z1, 0).reshape(n, 8, 8, c1).transpose(0, 3, 1, 2)
    cols2 = im2col(a1, 3, 1)
    z2 = cols2 @ p["conv2.weight"].reshape(c2, -1).T + p["conv2.bias"]
    a2 = np.maximum(z2, 0).reshape(n, 8, 8, c2).transpose(0, 3, 1, 2)
    win = a2.reshape(n, c2, 4, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c2, 4, 4, 4)
    pooled = win.max(axis=-1)
    f = pooled.reshape(n, -1)
    z3 = f @ p["fc1.weight"] + p["fc1.bias"]
    a3 = np.maximum(z3, 0)
    logits = a3 @ p["fc2.weight"] + p["fc2.bias"]
    if cache is not None:
        cache.update(cols1=cols1, z1=z1, a1=a1, cols2=cols2, z2=z2, win=win, f=f, z3=z3, a3=a3)
    return logits


def _digits_cnn_backward(p: Params, x: np.ndarray, c: dict, dlogits: np.ndarray) -> Params:
    n = len(x)
    c1, c2 = len(p["conv1.bias"]), len(p["conv2.bias"])
    g: Params = {"fc2.weight": c["a3"].T @ dlogits, "fc2.bias": dlogits.sum(0)}
    dz3 = (dlogits @ p["fc2.weight"].T) * (c["z3"] > 0)
    g["fc1.weight"], g["fc1.bias"] = c["f"].T @ dz3, dz3.sum(0)
    dpool = (dz3 @ p["fc1.weight"].T).reshape(n, c2, 4, 4)
    win = c["win"]
    first_max = np.argmax(win, axis=-1)[..., None]  # gradient to one max per window
    dwin = np.zeros_like(win)
    np.put_along_axis(dwin, first_max, dpool[..., None], axis=-1)
    da2 = dwin.reshape(n, c2, 4, 4, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c2, 8, 8)
    dz2 = da2.transpose(0, 2, 3, 1).reshape(-1, c2) * (c["z2"] > 0)
    g["conv2.weight"] = (dz2.T @ c["cols2"]).reshape(p["conv2.weight"].shape)
    g["conv2.bias"] = dz2.sum(0)
    da1 = col2im(dz2 @ p["conv2.weight"].reshape(c2, -1), (n, c1, 8, 8), 3, 1)
    dz1 = da1.transpose(0, 2, 3, 1).reshape(-1, c1) * (c["z1"] > 0)
    g["conv1.weight"] = (dz1.T @ c["cols1"]).reshape(p["conv1.weight"].shape)
    g["conv1.bias"] = dz1.sum(0)
    return g


@single_threaded
def train_digits_cnn(seed: int = 0, epochs: int = 30, batch: int = 64, lr: float = 2e-3,
                     verbose: bool = False) -> Params:
    """Train the digits CNN with Adam on the training split (about 10 s on one core)."""
    split = digits_split()
    p = digits_cnn_init(seed)
    opt = Adam(p, lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed + 1)
    steps = epochs * -(-len(split.y_train) // batch)
    t = 0
    for epoch in range(epochs):
        order = rng.permutation(len(split.y_train))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            cache: dict = {}
            logits = digits_cnn_forward(p, split.x_train[idx], cache)
            loss, dlogits = cross_entropy(logits, split.y_train[idx])
            g = _digits_cnn_backward(p, split.x_train[idx], cache, dlogits)
            opt.step(g, lr=lr * 0.5 * (1 + np.cos(np.pi * t / steps)))  # cosine decay
            t += 1
        if verbose:
            acc = accuracy(digits_cnn_forward(p, split.x_test), split.y_test)
            print(f"epoch {epoch + 1:2d} loss {loss:.4f} test accuracy {acc:.4f}")
    return p


@lru_cache(maxsize=1)
def digits_cnn_params() -> Params:
    """The shipped trained digits CNN weights (see ``python -m npu.models.train digits``)."""
    with resources.files("npu.models").joinpath("data", DIGITS_CNN_FILE).open("rb") as f:
        with np.load(f) as z:
            return {k: z[k].astype(np.float32) for k in z.files}


def digits_cnn(batch: int = 1, params: Params | None = None, softmax: bool = False
               ) -> onnx.ModelProto:
    """The small digits CNN, trained here on scikit-learn's digits (shipped weights).

    Input ``image`` [batch, 1, 8, 8] float32 in [0, 1] (pixel / 16); output ``logits``
    [batch, 10], or ``probs`` after a Softmax when ``softmax``. Layers: Conv 3x3 1->16 pad 1,
    Relu, Conv 3x3 16->32 pad 1, Relu, MaxPool 2x2, Flatten, Gemm 512->64, Relu, Gemm 64->10.
    """
    check_positive(batch=batch)
    p = digits_cnn_params() if params is None else params
    g = GraphBuilder("digits_cnn")
    x = g.input("image", [batch, 1, 8, 8])
    for i in (1, 2):
        w, b = g.const(f"conv{i}.weight", p[f"conv{i}.weight"]), g.const(f"conv{i}.bias",
                                                                         p[f"conv{i}.bias"])
        x = g.node("Conv", [x, w, b], f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        x = g.node("Relu", [x], f"relu{i}")
    x = g.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.node("Relu", [g.gemm(x, p["fc1.weight"], p["fc1.bias"], "fc1")], "relu3")
    return _classifier_head(g, x, p["fc2.weight"], p["fc2.bias"], batch, softmax,
                            "digits CNN trained on sklearn digits")


def _classifier_head(g: GraphBuilder, x: str, w: np.ndarray, b: np.ndarray, batch: int,
                     softmax: bool, doc: str) -> onnx.ModelProto:
    """The last Gemm, named ``logits``, then optionally a Softmax named ``probs``."""
    if softmax:
        g.node("Softmax", [g.gemm(x, w, b, "fc2", out="logits")], out="probs", axis=-1)
    else:
        g.gemm(x, w, b, "fc2", out="logits")
    g.output("probs" if softmax else "logits", [batch, 10])
    return g.build(doc)


# ------------------------------------------------------------------------------------------
# The 784-128-10 MLP (Dense(128, relu) -> Dense(10, softmax), as in the seed's Keras example)

def mlp_784_init(seed: int = 0, hidden: int = 128) -> Params:
    """He-initialised (seeded) parameters of the 784-hidden-10 MLP."""
    rng = np.random.default_rng(seed)
    return {"fc1.weight": he_normal(rng, 784, (784, hidden)),
            "fc1.bias": np.zeros(hidden, np.float32),
            "fc2.weight": he_normal(rng, hidden, (hidden, 10), gain=1.0),
            "fc2.bias": np.zeros(10, np.float32)}


def mlp_784_forward(p: Params, x: np.ndarray) -> np.ndarray:
    """numpy forward of the MLP: [N, 784] -> logits [N, 10]."""
    return np.maximum(x @ p["fc1.weight"] + p["fc1.bias"], 0) @ p["fc2.weight"] + p["fc2.bias"]


def train_mlp_784(seed: int = 0, epochs: int = 15, batch: int = 128, lr: float = 2e-3
                  ) -> Params:
    """Train the MLP on the digits upsampled to 28x28 (under a second); cached per seed."""
    return {k: v.copy() for k, v in _train_mlp_784(seed, epochs, batch, lr).items()}


@lru_cache(maxsize=4)
@single_threaded
def _train_mlp_784(seed: int, epochs: int, batch: int, lr: float) -> Params:
    split = digits_split()
    x, y = digits_784(split.x_train), split.y_train
    p = mlp_784_init(seed)
    opt = Adam(p, lr=lr)
    rng = np.random.default_rng(seed + 1)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            z1 = x[idx] @ p["fc1.weight"] + p["fc1.bias"]
            a1 = np.maximum(z1, 0)
            _, dz2 = cross_entropy(a1 @ p["fc2.weight"] + p["fc2.bias"], y[idx])
            dz1 = (dz2 @ p["fc2.weight"].T) * (z1 > 0)
            opt.step({"fc2.weight": a1.T @ dz2, "fc2.bias": dz2.sum(0),
                      "fc1.weight": x[idx].T @ dz1, "fc1.bias": dz1.sum(0)})
    return p


def mlp_784(batch: int = 1, seed: int = 0, trained: bool = False, softmax: bool = True,
            params: Params | None = None) -> onnx.ModelProto:
    """The 784-128-10 MLP of the seeds: Gemm 784->128, Relu, Gemm 128->10, Softmax.

    Input ``image`` [batch, 784] (a 28x28 image flattened; see
    :func:`npu.models.data.digits_784`); output ``probs`` [batch, 10] (``logits`` without
    ``softmax``). Weights are seeded He-init, or trained on the upsampled digits when
    ``trained`` (about a second, cached).
    """
    check_positive(batch=batch)
    if params is None:
        params = train_mlp_784(seed) if trained else mlp_784_init(seed)
    g = GraphBuilder("mlp_784")
    x = g.input("image", [batch, 784])
    x = g.node("Relu", [g.gemm(x, params["fc1.weight"], params["fc1.bias"], "fc1")], "relu1")
    return _classifier_head(g, x, params["fc2.weight"], params["fc2.bias"], batch, softmax,
                            "784-128-10 MLP")


# ------------------------------------------------------------------------------------------
# Fixed-weight filters

#: OpenCV's ``GaussianBlur(img, (5, 5), 0)`` uses this fixed 5-tap kernel (its table for
#: ksize <= 7 with sigma <= 0), not a sampled Gaussian: the binomial 1 4 6 4 1 / 16.
GAUSS5 = np.array([1, 4, 6, 4, 1], np.float32) / 16


def gaussian_kernel_5x5() -> np.ndarray:
    """The separable 5x5 Gaussian blur kernel (sums to 1)."""
    return np.outer(GAUSS5, GAUSS5).astype(np.float32)


def gaussian_blur(channels: int = 3, height: int = 32, width: int = 32, batch: int = 1,
                  border: str = "zero") -> onnx.ModelProto:
    """5x5 Gaussian blur as a depthwise Conv (group = channels, kernel [C, 1, 5, 5]).

    Input ``image`` [batch, channels, height, width]; output ``blurred``, same shape.
    ``border="zero"``: the Conv's own zero padding (a pure NPU graph). ``border="reflect"``: a
    reflect Pad first, which makes the result equal to ``cv2.GaussianBlur(img, (5, 5), 0)``
    (BORDER_REFLECT_101) on each channel.
    """
    check_positive(channels=channels, height=height, width=width, batch=batch)
    if border not in ("zero", "reflect"):
        raise ModelError(f"border must be 'zero' or 'reflect', got {border!r}")
    if border == "reflect" and min(height, width) < 3:
        raise ModelError("border='reflect' needs height and width >= 3")
    g = GraphBuilder("gaussian_blur")
    x = g.input("image", [batch, channels, height, width])
    kernel = np.broadcast_to(gaussian_kernel_5x5(), (channels, 1, 5, 5)).copy()
    w = g.const("gauss.weight", kernel)
    pads = [2, 2, 2, 2]
    if border == "reflect":
        x = g.node("Pad", [x, g.const("pads", np.array([0, 0, 2, 2, 0, 0, 2, 2], np.int64))],
                   "reflect_pad", mode="reflect")
        pads = [0, 0, 0, 0]
    g.node("Conv", [x, w], "gauss", out="blurred", kernel_shape=[5, 5], pads=pads,
           group=channels)
    g.output("blurred", [batch, channels, height, width])
    return g.build("5x5 Gaussian blur, depthwise")


def moving_average(length: int = 64, k: int = 5, batch: int = 1) -> onnx.ModelProto:
    """1-D moving average (``np.convolve(x, ones(k) / k, 'valid')``) as a Conv [1, 1, k].

    Input ``signal`` [batch, 1, length]; output ``smoothed`` [batch, 1, length - k + 1].
    """
    check_positive(length=length, k=k, batch=batch)
    if k > length:
        raise ModelError(f"k={k} is longer than the signal (length={length})")
    g = GraphBuilder("moving_average")
    x = g.input("signal", [batch, 1, length])
    w = g.const("box.weight", np.full((1, 1, k), 1.0 / k, np.float32))
    g.node("Conv", [x, w], "box", out="smoothed", kernel_shape=[k])
    g.output("smoothed", [batch, 1, length - k + 1])
    return g.build(f"moving average, k={k}")
