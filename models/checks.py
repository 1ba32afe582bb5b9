"""Accuracy checks of the models through the NPU (compiler + simulator) against float.

Used by the test suite and by ``npu demo``:

* :func:`int8_agreement`: a compiled session's int8 outputs vs onnxruntime on the same QDQ
  model (the bit-level check for every builder);
* :func:`digits_check`: the digits CNN's test accuracy on the NPU vs float;
* :func:`nerf_check`: a view of the procedural scene rendered through the NPU and through
  float onnxruntime (PSNR between them, and against the ground truth);
* :func:`karate_check`: GNN node predictions on the NPU vs float on karate club.

Each returns a small result object that keeps the session, so callers can read its profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from . import cnn, gnn, nerf
from .data import accuracy, digits_split

Feeds = Mapping[str, np.ndarray]


def _ort(model: onnx.ModelProto, kernels: str = "float", extra_int8: Sequence[str] = ()
         ) -> Any:
    """onnxruntime on ``model``: float models as written; QDQ models with ``kernels="int8"``
    (its integer kernels, the NPU's bit-exact reference)."""
    from npu.compiler.quantize import onnxruntime_session

    return onnxruntime_session(model, kernels, extra_int8)


def _session(model: onnx.ModelProto, config: str, calibration: Any) -> Any:
    from npu.compiler.session import InferenceSession

    return InferenceSession(model, config, calibration=calibration)


@dataclass
class Agreement:
    """Per quantized output: fraction of identical int8 values and the largest difference."""

    outputs: dict[str, tuple[float, int]]

    @property
    def identical(self) -> float:
        return min(v[0] for v in self.outputs.values())

    @property
    def max_diff(self) -> int:
        return max(v[1] for v in self.outputs.values())


def int8_agreement(session: Any, feeds: Feeds, kernels: str = "float") -> Agreement:
    """Run ``feeds`` through an NPU session and onnxruntime on its QDQ model; compare the int8
    tensors whose dequantization are the graph outputs.

    ``kernels="float"`` (default) runs the QDQ graph as written: the builders' graphs end in
    host ops (Softmax, ...) that the NPU session runs that way, whereas onnxruntime's integer
    path replaces Softmax by its LUT approximation (QLinearSoftmax) and cannot run every
    quantized graph (QLinearMatMul rejects a per-channel constant left operand).
    ``kernels="int8"`` compares with onnxruntime's integer kernels, which NPU-computed tensors
    match bit for bit (see :func:`npu.compiler.quantize.onnxruntime_session`)."""
    qdq = session.qdq_model
    producer = {o: n for n in qdq.graph.node for o in n.output}
    names = [producer[o.name].input[0] for o in qdq.graph.output
             if o.name in producer and producer[o.name].op_type == "DequantizeLinear"]
    if not names:
        raise ValueError("the QDQ model has no quantized outputs to compare")
    session.run(None, dict(feeds))
    ours = {n: np.asarray(session.tensors[n], np.int64) for n in names}
    ref_sess = _ort(qdq, kernels, extra_int8=names)
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, dict(feeds))))
    out = {}
    for n in names:
        a, b = ours[n], np.asarray(ref[n], np.int64)
        out[n] = (float(np.mean(a == b)), int(np.abs(a - b).max(initial=0)))
    return Agreement(out)


# ------------------------------------------------------------------------------------------

@dataclass
class DigitsResult:
    """Test accuracy of the digits CNN in float (onnxruntime) and on the NPU."""

    float_accuracy: float
    npu_accuracy: float
    n_images: int
    session: Any = field(repr=False)


def digits_check(config: str = "npu16", n_images: int | None = None,
                 n_calibration: int = 64) -> DigitsResult:
    """The digits CNN on the test split (all 359 images in one batch by default), compiled
    with about ``n_calibration`` training images (at least one batch) as calibration data."""
    split = digits_split()
    n = len(split.y_test) if n_images is None else n_images
    x, y = split.x_test[:n], split.y_test[:n]
    model = cnn.digits_cnn(batch=n)
    # The batch is static, so calibration comes in whole batches of training images.
    batches = max(1, min(n_calibration // n, len(split.y_train) // n))
    calib = [{"image": split.x_train[i * n:(i + 1) * n]} for i in range(batches)]
    sess = _session(model, config, calib)
    npu_logits = sess.run(None, {"image": x})[0]
    float_logits = _ort(model).run(None, {"image": x})[0]
    return DigitsResult(accuracy(float_logits, y), accuracy(npu_logits, y), n, sess)


# ------------------------------------------------------------------------------------------

@dataclass
class NeRFResult:
    """A view rendered through the NPU and through float onnxruntime, and the ground truth."""

    npu_image: np.ndarray
    float_image: np.ndarray
    truth: np.ndarray
    psnr_npu_vs_float: float
    psnr_float_vs_truth: float
    psnr_npu_vs_truth: float
    n_points: int
    session: Any = field(repr=False)
    runs: int = 0


#: Sample points per NPU run of the scene NeRF (large row batches keep the array busy).
NERF_BATCH = 8192
#: Whether the NPU render uses the in-graph (Sin/Cos) encoding or encodes on the host.
NERF_ENCODE_IN_GRAPH = False


def nerf_check(config: str = "npu16", size: int = 100, batch: int = NERF_BATCH,
               view: tuple[float, float] = nerf.DEFAULT_VIEW,
               encode_in_graph: bool = NERF_ENCODE_IN_GRAPH, progress: bool = False
               ) -> NeRFResult:
    """Render the scene NeRF (64 samples per ray, near 2, far 6) on a ``size`` x ``size`` view
    through the NPU and through float onnxruntime. Calibration: points on other rays."""
    params = nerf.scene_nerf_params()
    model = nerf.nerf_mlp(batch, params=params, encode_in_graph=encode_in_graph)
    pts, dirs = nerf.ray_points(2 * batch, seed=11)
    calib = []
    for i in range(2):
        p, d = pts[i * batch:(i + 1) * batch], dirs[i * batch:(i + 1) * batch]
        calib.append({"xyz": p, "viewdir": d} if encode_in_graph else
                     {"x_enc": nerf.positional_encoding(p, nerf.L_POS),
                      "d_enc": nerf.positional_encoding(d, nerf.L_DIR)})
    sess = _session(model, config, calib)
    o, d = nerf.camera_rays(size, size, nerf.orbit_camera(*view))
    bound = nerf.Scene().bound
    counter = _Counting(sess, progress, "NeRF on the NPU")
    npu_img = nerf.render(nerf.session_query(counter, batch), o, d, bound=bound)
    counter.close()
    float_img = nerf.render(nerf.session_query(_ort(model), batch), o, d, bound=bound)
    truth = nerf.render(nerf.Scene().query, o, d, bound=bound)
    shape = (size, size, 3)
    return NeRFResult(npu_img.reshape(shape), float_img.reshape(shape), truth.reshape(shape),
                      nerf.psnr(npu_img, float_img), nerf.psnr(float_img, truth),
                      nerf.psnr(npu_img, truth), counter.points, sess, counter.runs)


class _Counting:
    """Wraps a session: counts runs and points, optionally with a tqdm progress bar."""

    def __init__(self, session: Any, progress: bool, desc: str) -> None:
        self.session = session
        self.runs = 0
        self.points = 0
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="run", leave=False)

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()

    def run(self, names: Any, feeds: Feeds) -> Any:
        self.runs += 1
        self.points += len(next(iter(feeds.values())))
        if self.bar is not None:
            self.bar.update(1)
        return self.session.run(names, feeds)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------

@dataclass
class KarateResult:
    """GNN node predictions on karate club: NPU vs float."""

    kind: str
    agreement: float
    float_accuracy: float
    npu_accuracy: float
    session: Any = field(repr=False)


def karate_check(kind: str = "gcn", config: str = "npu16") -> KarateResult:
    """Compile the trained karate GNN (``"gcn"``, ``"sage"`` or ``"gin"``), run it on the NPU
    and compare its predicted clubs with float onnxruntime."""
    build = {"gcn": gnn.gcn, "sage": gnn.graphsage, "gin": gnn.gin}
    if kind not in build:
        raise ValueError(f"kind must be one of {sorted(build)}, got {kind!r}")
    model = build[kind]("karate")
    feeds = gnn.gnn_feeds(kind, "karate")
    sess = _session(model, config, [feeds])
    npu_logits = sess.run(None, feeds)[0]
    float_logits = _ort(model).run(None, feeds)[0]
    labels = gnn.karate_graph().labels
    agree = float(np.mean(npu_logits.argmax(1) == float_logits.argmax(1)))
    return KarateResult(kind, agree, accuracy(float_logits, labels),
                        accuracy(npu_logits, labels), sess)
