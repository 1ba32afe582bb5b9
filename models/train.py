"""Re-create the trained weights shipped in ``models/data/`` (seeded; run once, not at import).

    python -m npu.models.train digits   # digits CNN  -> data/digits_cnn.npz  (~10 s)
    python -m npu.models.train nerf     # scene NeRF  -> data/nerf_scene.npz  (~2 CPU min)
    python -m npu.models.train all

The builders load these files, so tests and the demo never train the larger models. Results
match the shipped files up to BLAS summation order.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"


def train_digits(out: Path) -> None:
    """Train the digits CNN and write its float32 weights."""
    from .cnn import digits_cnn_forward, train_digits_cnn
    from .data import accuracy, digits_split

    t0 = time.time()
    p = train_digits_cnn(verbose=True)
    split = digits_split()
    acc = accuracy(digits_cnn_forward(p, split.x_test), split.y_test)
    np.savez_compressed(out, **p)
    print(f"digits CNN: test accuracy {acc:.4f}, {time.time() - t0:.1f} s -> {out}")


def train_nerf(out: Path) -> None:
    """Train the scene NeRF and write its weights as float16."""
    from .nerf import TRAINED_CONFIG, save_nerf_params, train_scene_nerf

    t0 = time.time()
    p = train_scene_nerf(verbose=True, **TRAINED_CONFIG)
    save_nerf_params(out, p)
    print(f"scene NeRF: {time.time() - t0:.1f} s -> {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["digits", "nerf", "all"])
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.what in ("digits", "all"):
        train_digits(args.out_dir / "digits_cnn.npz")
    if args.what in ("nerf", "all"):
        train_nerf(args.out_dir / "nerf_scene.npz")


if __name__ == "__main__":
    main()
