"""Per-operator tests: float model -> onnxruntime quantization -> compile -> simulate, compared
int8 for int8 with onnxruntime running the same QDQ model (>= 99% identical, none off by more
than one; most cases are exact)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from opmodels import Model, agreement, compare


def _conv(cin: int, cout: int, hw: int | tuple[int, int], k: int | tuple[int, int], relu=True,
          **attrs) -> onnx.ModelProto:
    h, w = (hw, hw) if isinstance(hw, int) else hw
    m = Model(cin * 100 + cout)
    y = m.conv(m.input("x", (1, cin, h, w)), cin, cout, k, **attrs)
    if relu:
        y = m.op("Relu", [y])
    return m.build([y])


def conv_3x3():
    return _conv(16, 32, 10, 3, pads=[1, 1, 1, 1])


def conv_rgb_7x7_s2():       # the first layer of ResNet: packed kw*C reduction
    return _conv(3, 16, 20, 7, strides=[2, 2], pads=[3, 3, 3, 3])


def conv_1x1_s2():
    return _conv(24, 20, 9, 1, strides=[2, 2], relu=False)


def conv_dilated():
    return _conv(8, 16, 12, 3, dilations=[2, 2], pads=[2, 2, 2, 2])


def conv_asym_pads_no_bias():
    return _conv(5, 7, (9, 11), (3, 2), pads=[0, 1, 2, 0], bias=False, relu=False)


def conv_same_upper():
    return _conv(16, 16, 7, 3, strides=[2, 2], auto_pad="SAME_UPPER")


def conv_grouped():
    return _conv(16, 32, 8, 3, group=4, pads=[1, 1, 1, 1])


def conv_depthwise():
    return _conv(32, 32, 8, 3, group=32, pads=[1, 1, 1, 1])


def conv_wide_channels():    # several reduction and output chunks, odd sizes
    return _conv(70, 45, 6, 3, pads=[1, 1, 1, 1], relu=False)


def conv_1d():
    m = Model(7)
    y = m.conv(m.input("x", (1, 12, 20)), 12, 10, (3,), pads=[1, 1])
    return m.build([m.op("Relu", [y])])


def gemm():
    m = Model(1)
    x = m.input("x", (3, 40))
    return m.build([m.op("Gemm", [x, m.weight((24, 40)), m.const(
        np.linspace(-1, 1, 24).astype(np.float32))], transB=1)])


def gemm_no_trans():
    m = Model(2)
    x = m.input("x", (2, 33))
    return m.build([m.op("Gemm", [x, m.weight((33, 17))])])


def matmul_3d():
    m = Model(3)
    x = m.input("x", (2, 5, 20))
    return m.build([m.op("MatMul", [x, m.weight((20, 12))])])


def _tail(m: Model, y: str, c: int) -> str:
    """A quantized consumer after the op under test: onnxruntime leaves a float op at the end
    of a graph unquantized."""
    return m.conv(y, c, c, 1)


def relu_standalone():       # the conv output has two users, so the Relu is not folded away
    m = Model(4)
    c = m.conv(m.input("x", (1, 4, 5, 5)), 4, 8, 1)
    r = m.op("Relu", [c])
    p = m.op("MaxPool", [c], kernel_shape=[1, 1])
    return m.build([_tail(m, r, 8), _tail(m, p, 8)])


def clip_standalone():
    m = Model(5)
    c = m.conv(m.input("x", (1, 4, 3, 3)), 4, 20, 1)
    r = m.op("Clip", [c, m.const(np.float32(-0.5)), m.const(np.float32(1.0))])
    p = m.op("MaxPool", [c], kernel_shape=[1, 1])
    return m.build([_tail(m, r, 20), _tail(m, p, 20)])


def add_inputs():
    m = Model(6)
    y = m.op("Add", [m.input("a", (1, 20, 6, 6)), m.input("b", (1, 20, 6, 6))])
    return m.build([_tail(m, y, 20)])


def sum_residual():          # ResNet's block end: conv + shortcut, Relu
    m = Model(8)
    x = m.input("x", (1, 16, 8, 8))
    y = m.op("Relu", [m.conv(x, 16, 16, 3, pads=[1, 1, 1, 1])])
    y = m.conv(y, 16, 16, 1)
    return m.build([_tail(m, m.op("Relu", [m.op("Sum", [y, x])]), 16)])


def maxpool_3x3_s2():
    m = Model(9)
    x = m.op("Relu", [m.conv(m.input("x", (1, 8, 13, 13)), 8, 20, 1)])
    return m.build([m.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1])])


def _pre(m: Model, c: int, hw: tuple[int, int]) -> str:
    """A conv feeding the op under test (onnxruntime quantizes pools only after a quantized
    producer)."""
    return m.conv(m.input("x", (1, 4) + hw), 4, c, 1)


def maxpool_ceil():
    m = Model(10)
    return m.build([m.op("MaxPool", [_pre(m, 5, (10, 10))], kernel_shape=[3, 3],
                         strides=[2, 2], ceil_mode=1)])


def maxpool_global():
    m = Model(11)
    return m.build([_tail(m, m.op("GlobalMaxPool", [_pre(m, 18, (5, 4))]), 18)])


def avgpool_2x2():
    m = Model(12)
    return m.build([m.op("AveragePool", [_pre(m, 24, (8, 8))], kernel_shape=[2, 2],
                         strides=[2, 2])])


def avgpool_pad_include():
    m = Model(13)
    return m.build([m.op("AveragePool", [_pre(m, 16, (7, 7))], kernel_shape=[3, 3],
                         strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)])


def global_avgpool():
    m = Model(14)
    x = m.op("Relu", [m.conv(m.input("x", (1, 16, 7, 7)), 16, 40, 1)])
    return m.build([m.op("GlobalAveragePool", [x])])


def global_avgpool_wide():   # many chunks: the streamed first block covers all of them
    m = Model(20)
    x = m.op("Relu", [m.conv(m.input("x", (1, 8, 5, 5)), 8, 150, 1)])
    return m.build([m.op("GlobalAveragePool", [x])])


def conv_streamed_weights():  # weights larger than SPAD: streamed through the ring
    m = Model(21)
    x = m.op("Relu", [m.conv(m.input("x", (1, 512, 7, 7)), 512, 512, 1)])
    return m.build([m.conv(x, 512, 600, 3, pads=[1, 1, 1, 1])])


def conv_streamed_tiles():    # streamed weights re-read for each of several spatial tiles
    m = Model(22)
    x = m.input("x", (1, 256, 24, 24))
    return m.build([m.conv(x, 256, 512, 1)])


def concat_convs():          # SqueezeNet's fire module: two convs written in place
    m = Model(15)
    x = m.op("Relu", [m.conv(m.input("x", (1, 24, 9, 9)), 24, 16, 1)])
    a = m.op("Relu", [m.conv(x, 16, 24, 1)])
    b = m.op("Relu", [m.conv(x, 16, 40, 3, pads=[1, 1, 1, 1])])
    return m.build([m.op("Concat", [a, b], axis=1)])


def concat_inputs():         # not produced on the NPU: copies
    m = Model(16)
    return m.build([m.op("Concat", [m.input("a", (1, 5, 4, 4)), m.input("b", (1, 12, 4, 4))],
                         axis=1)])


def flatten_gemm():          # NHWC flatten: the Gemm weights are permuted instead
    m = Model(17)
    x = m.op("Relu", [m.conv(m.input("x", (1, 4, 5, 5)), 4, 8, 3, pads=[1, 1, 1, 1])])
    f = m.op("Flatten", [x])
    return m.build([m.op("Gemm", [f, m.weight((10, 200))], transB=1)])


def reshape_pool_gemm():     # ResNet's tail: pool, Reshape [1, C], Gemm
    m = Model(18)
    x = m.op("Relu", [m.conv(m.input("x", (1, 8, 4, 4)), 8, 32, 1)])
    p = m.op("AveragePool", [x], kernel_shape=[4, 4])
    r = m.op("Reshape", [p, m.const(np.array([1, 32], np.int64))])
    return m.build([m.op("Gemm", [r, m.weight((12, 32))], transB=1)])


def gather_embedding():
    m = Model(19)
    idx = m.input("idx", (2, 3), TensorProto.INT64)
    table = m.const((m.rng.standard_normal((8, 20)) * 0.5).astype(np.float32), "table")
    return m.build([m.op("Gather", [table, idx], axis=0)])


def avgpool_2x2_ties():
    """2x2 average with the input's scale (onnxruntime's QDQ AveragePool keeps it): a quarter
    of the exact results are ties x.5, which the NPU rounds half to even while onnxruntime's
    QLinearAveragePool (a float32 sum of dequantized values, divided by the count) resolves
    them either way. Every difference must be such a tie."""
    model = avgpool_2x2()
    ours, theirs, sess = compare(model, "npu16", seed=1, observe="all")
    x_name = next(n for n in sess.tensors if n.startswith("conv3_QuantizeLinear"))
    x = sess.tensors[x_name].astype(np.int64)
    zp = int(sess.graph.tensors[x_name].quant.zero_point)
    s = sum(x[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)) - 4 * zp
    ties = (s % 4) == 2
    key = next(k for k in ours if k.startswith("averagepool"))
    a, b = ours[key].astype(np.int64), theirs[key].astype(np.int64)
    return a - zp, b - zp, ties


CASES: dict[str, Callable[[], onnx.ModelProto]] = {f.__name__: f for f in (
    conv_3x3, conv_rgb_7x7_s2, conv_1x1_s2, conv_dilated, conv_asym_pads_no_bias,
    conv_same_upper, conv_grouped, conv_depthwise, conv_wide_channels, conv_1d, gemm,
    gemm_no_trans, matmul_3d, relu_standalone, clip_standalone, add_inputs, sum_residual,
    maxpool_3x3_s2, maxpool_ceil, maxpool_global, avgpool_pad_include, global_avgpool,
    global_avgpool_wide, conv_streamed_weights, conv_streamed_tiles,
    concat_convs, concat_inputs, flatten_gemm, reshape_pool_gemm, gather_embedding)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_operator_matches_onnxruntime(name: str) -> None:
    model = CASES[name]()
    ours, theirs, sess = compare(model, "npu16", seed=1)
    assert ours, "no output compared"
    for key in ours:
        same, worst = agreement(ours[key], theirs[key])
        assert worst <= 1, f"{key}: off by {worst}"
        assert same >= 0.99, f"{key}: only {same:.2%} identical"
    # Everything here runs on the NPU (only the I/O conversions on the host).
    fallbacks = sess.report()["host_fallbacks"]
    assert not fallbacks, fallbacks


@pytest.mark.parametrize("config", ["npu4", "npu8", "npu32"])
@pytest.mark.parametrize("name", ["conv_rgb_7x7_s2", "conv_wide_channels", "sum_residual",
                                  "concat_convs", "maxpool_3x3_s2", "gemm",
                                  "conv_streamed_weights"])
def test_other_configs(name: str, config: str) -> None:
    ours, theirs, _ = compare(CASES[name](), config, seed=2)
    for key in ours:
        same, worst = agreement(ours[key], theirs[key])
        assert worst <= 1 and same >= 0.99, (key, same, worst)


def test_avgpool_differs_only_at_exact_ties() -> None:
    a, b, ties = avgpool_2x2_ties()
    assert np.abs(a - b).max() <= 1
    assert np.all(a[~ties] == b[~ties]), "a difference that is not an exact tie"
    assert ties.any()
    assert np.all(a[ties] % 2 == 0), "the NPU rounds ties half to even"
