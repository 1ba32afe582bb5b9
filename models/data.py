"""Small real data sets that ship with the installed packages (nothing is downloaded).

* scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, values 0..16);
* the same digits bilinearly upsampled to 28x28 for the 784-128-10 MLP;
* accuracy helpers shared by the tests and the demo.

Graph data (karate club, synthetic block model) lives in :mod:`npu.models.gnn`; the NeRF scene
in :mod:`npu.models.nerf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

#: The fixed seed of the digits train/test split.
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class Split:
    """A train/test split: images float32 in [0, 1], labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    return images, d.target.astype(np.int64)


def digits_split(test_fraction: float = 0.2, seed: int = DIGITS_SPLIT_SEED) -> Split:
    """The digits as [N, 1, 8, 8] float32 in [0, 1], split stratified per class.

    With the defaults: 1,438 training and 359 test images, the same on every machine.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _load_digits()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test[idx[:round(len(idx) * test_fraction)]] = True
    return Split(images[~test], labels[~test], images[test], labels[test])


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] linear interpolation weights with pixel centres aligned (half-pixel)."""
    pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upsample(images: np.ndarray, size: int = 28) -> np.ndarray:
    """Bilinear resize of [..., h, w] images to [..., size, size] (float32)."""
    h, w = images.shape[-2:]
    rows, cols = _interp_matrix(size, h), _interp_matrix(size, w)
    return np.einsum("ih,...hw,jw->...ij", rows, images, cols).astype(np.float32)


def digits_784(images: np.ndarray) -> np.ndarray:
    """Digits [N, 1, 8, 8] as the 784-128-10 MLP's input: upsampled to 28x28, flattened."""
    return upsample(images[:, 0], 28).reshape(len(images), 784)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    scores = np.asarray(scores).reshape(len(labels), -1)
    return float(np.mean(scores.argmax(axis=1) == labels))
