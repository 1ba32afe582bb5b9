"""The patterns behind the ShuffleNet and DenseNet-121 gaps, small, against onnxruntime.

* An AveragePool whose output fuse redirects into another tensor (a concat view, an absorbed
  add): its VECTOR parameters must keep the pool's *own* output quantization, the redirect's
  rescale being an epilogue step. It used the redirected tensor's scale and zero point, so the
  rescale was applied twice (ShuffleNet: 85% of int8 probabilities identical, off by up to 31).
* DenseNet's pre-activation BatchNormalization (after a Concat, so not foldable into a Conv)
  with the per-channel Mul/Add after it: one depthwise 1x1 Conv on the NPU (it was three host
  ops with Q/DQ borders, 63 NPU segments for DenseNet-121; now one).
"""

from __future__ import annotations

import pytest
from opmodels import Model, agreement, compare
from test_frontend import _preactivation_bn


def _avgpool_concat(cip: int) -> Model:
    """ShuffleNet's downsampling unit: concat(avgpool 3x3/2, relu(conv 3x3/2)), then Relu."""
    m = Model(5)
    x = m.input("x", (1, 8, 12, 12))
    a = m.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             count_include_pad=cip)
    c = m.op("Relu", [m.conv(x, 8, 8, 3, strides=[2, 2], pads=[1, 1, 1, 1])])
    return m.build([m.op("Relu", [m.op("Concat", [a, c], axis=1)])])


def _avgpool_add() -> Model:
    """avgpool(x) + conv(x): the Add becomes an epilogue step of the pool."""
    m = Model(6)
    x = m.input("x", (1, 8, 12, 12))
    c = m.conv(x, 8, 8, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    a = m.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    return m.build([m.op("Add", [c, a])])


@pytest.mark.parametrize("build", [lambda: _avgpool_concat(0), lambda: _avgpool_concat(1),
                                   _avgpool_add], ids=["concat", "concat_pad", "add"])
def test_fused_avgpool_matches_onnxruntime(build) -> None:
    # Against the QDQ graph's own float semantics (what checks.int8_agreement uses for whole
    # models): before the fix 74% (concat) and 0% (add) identical, off by up to 56 and 17.
    ours, theirs, sess = compare(build(), "npu16", seed=3, kernels="float")
    assert ours
    pools = [n for n in sess.graph.nodes if n.op == "avgpool"]
    # The pool was fused: it writes a tensor of another quantization than its own.
    assert pools and all(n.attrs["epilogue"] for n in pools)
    for key in ours:
        same, worst = agreement(ours[key], theirs[key])
        assert worst <= 1 and same >= 0.99, (key, same, worst)


def test_preactivation_batchnorm_runs_on_the_npu() -> None:
    ours, theirs, sess = compare(_preactivation_bn(), "npu16", seed=4)
    assert ours
    assert not sess.report()["host_fallbacks"], sess.report()["host_fallbacks"]
    assert len(sess.report()["segments"]) == 1
    for key in ours:
        same, worst = agreement(ours[key], theirs[key])
        assert worst <= 1 and same >= 0.99, (key, same, worst)
