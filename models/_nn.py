"""Just enough numpy to train the small models here: Adam, im2col convolution, cross-entropy.

Training is float32 (float64 where noted), single threaded in spirit and seeded, so a re-run
gives the same weights up to BLAS summation order.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)


def single_threaded(fn: F) -> F:
    """Run ``fn`` with one BLAS thread: training multiplies small matrices, where two threads
    fighting over a shared 2-core machine are many times slower than one."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits  # installed with scikit-learn
        except ImportError:  # pragma: no cover - scikit-learn is a dependency
            ctx = contextlib.nullcontext()
        else:
            ctx = threadpool_limits(1)
        with ctx:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Adam:
    """Adam (beta1 0.9, beta2 0.999, eps 1e-8) over a dict of float arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], lr: float = 1e-3,
                 weight_decay: float = 0.0) -> None:
        self.params = params
        self.lr = lr
        self.weight_decay = weight_decay
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """One update with ``grads`` (same keys as the parameters)."""
        self.t += 1
        lr = self.lr if lr is None else lr
        b1, b2, eps = 0.9, 0.999, 1e-8
        for k, p in self.params.items():
            g = grads[k]
            if self.weight_decay and p.ndim > 1:
                g = g + self.weight_decay * p
            self.m[k] = b1 * self.m[k] + (1 - b1) * g
            self.v[k] = b2 * self.v[k] + (1 - b2) * g * g
            m_hat = self.m[k] / (1 - b1 ** self.t)
            v_hat = self.v[k] / (1 - b2 ** self.t)
            p -= (lr * m_hat / (np.sqrt(v_hat) + eps)).astype(p.dtype)


def im2col(x: np.ndarray, k: int, pad: int) -> np.ndarray:
    """[N, C, H, W] -> [N*H'*W', C*k*k] patches of a stride-1 k x k window (zero padding).

    Column order is (c, ky, kx), matching an ONNX Conv weight [O, C, k, k] reshaped to [O, C*k*k].
    """
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    cols = np.empty((n, c, k, k, ho, wo), dtype=x.dtype)
    for ky in range(k):
        for kx in range(k):
            cols[:, :, ky, kx] = xp[:, :, ky:ky + ho, kx:kx + wo]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c * k * k)


def col2im(cols: np.ndarray, shape: tuple[int, int, int, int], k: int, pad: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-add patch gradients back to [N, C, H, W]."""
    n, c, h, w = shape
    ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    cols = cols.reshape(n, ho, wo, c, k, k).transpose(0, 3, 4, 5, 1, 2)
    xp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for ky in range(k):
        for kx in range(k):
            xp[:, :, ky:ky + ho, kx:kx + wo] += cols[:, :, ky, kx]
    return xp[:, :, pad:pad + h, pad:pad + w]


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray,
                  mask: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the (masked) rows and its gradient w.r.t. ``logits``."""
    p = softmax(logits.astype(np.float64))
    rows = np.arange(len(labels))
    weight = np.ones(len(labels)) if mask is None else mask.astype(np.float64)
    weight = weight / weight.sum()
    loss = float(-(weight * np.log(p[rows, labels] + 1e-12)).sum())
    grad = p
    grad[rows, labels] -= 1.0
    return loss, (grad * weight[:, None]).astype(logits.dtype)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function without overflow warnings."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))
