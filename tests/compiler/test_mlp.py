"""MLP lowerings (issue 7 item 2, NeRF): split-K concatenation and fused sibling matmuls.

Each rewrite is checked against onnxruntime on the same QDQ model (int8 outputs), the programs
against the IR interpreter (every stored tensor bit for bit), and the IR for its shape (no
concat node, a matmul listing both inputs, one fused node writing both outputs).
"""

from __future__ import annotations

import numpy as np
import pytest
from opmodels import Model, agreement, compare, programs_match_ir

from npu.compiler.reference import run_graph
from npu.compiler.session import InferenceSession
from npu.models import nerf


def _exact_vs_onnxruntime(model, seed: int = 0, config: str = "npu16") -> InferenceSession:
    ours, theirs, sess = compare(model, config, seed=seed)
    assert ours
    for name in ours:
        same, diff = agreement(ours[name], theirs[name])
        assert same >= 0.999 and diff <= 1, (name, same, diff)
    return sess


def _skip_model(rows: int, c_in: int, c_hidden: int, c_out: int, seed: int = 0,
                relu_hidden: bool = True):
    """y = relu(concat(x, h) @ W2 + b2), h = relu(x @ W1 + b1): NeRF's skip connection."""
    m = Model(seed)
    x = m.input("x", (rows, c_in))
    h = m.op("Gemm", [x, m.weight((c_in, c_hidden)), m.weight((c_hidden,), 0.1)])
    if relu_hidden:
        h = m.op("Relu", [h])
    cat = m.op("Concat", [x, h], axis=1)
    y = m.op("Relu", [m.op("Gemm", [cat, m.weight((c_in + c_hidden, c_out)),
                                     m.weight((c_out,), 0.1)])])
    return m.build([y])


@pytest.mark.parametrize("rows,c_in,c_hidden,c_out", [(40, 63, 64, 24), (37, 5, 20, 17),
                                                      (64, 16, 32, 16)])
def test_split_k_concat_matches_onnxruntime(rows, c_in, c_hidden, c_out) -> None:
    model = _skip_model(rows, c_in, c_hidden, c_out)
    sess = _exact_vs_onnxruntime(model)
    g = sess.graph
    assert not [n for n in g.nodes if n.op == "concat"]          # never materialized
    [mm] = [n for n in g.nodes if n.op == "conv" and "k_parts" in n.attrs]
    assert mm.attrs["k_parts"] == [c_in, c_hidden]
    assert len(mm.inputs) == 2
    # K chunks: each part starts on its own chunk of 16 lanes.
    assert mm.plan.cj == -(-c_in // 16) + -(-c_hidden // 16)
    feeds = {"x": np.random.default_rng(5).standard_normal((rows, c_in)).astype(np.float32)}
    assert programs_match_ir(sess, feeds) >= 3


def test_split_k_on_other_configs() -> None:
    model = _skip_model(50, 63, 40, 20, seed=2)
    for cfg in ("npu4", "npu32"):
        _exact_vs_onnxruntime(model, seed=1, config=cfg)


def test_split_k_three_inputs_one_shared_quant_and_two_readers() -> None:
    """Three parts, the concat read by two matmuls: both become split-K, no copy of any part
    that already has the concat's quantization."""
    m = Model(3)
    x = m.input("x", (33, 12))
    a = m.op("Relu", [m.op("Gemm", [x, m.weight((12, 20)), m.weight((20,), 0.1)])])
    b = m.op("Gemm", [x, m.weight((12, 9)), m.weight((9,), 0.1)])
    cat = m.op("Concat", [a, x, b], axis=1)
    y1 = m.op("Gemm", [cat, m.weight((41, 7)), m.weight((7,), 0.1)])
    y2 = m.op("Gemm", [cat, m.weight((41, 18)), m.weight((18,), 0.1)])
    sess = _exact_vs_onnxruntime(m.build([y1, y2]), seed=3)
    mms = [n for n in sess.graph.nodes if n.op == "conv" and "k_parts" in n.attrs]
    assert len(mms) == 2 and all(n.attrs["k_parts"] == [20, 12, 9] for n in mms)
    assert mms[0].inputs == mms[1].inputs
    # Every part is in the concat's quantization; only x (also read by the Gemms) can need
    # a rescale copy, the Gemm outputs are written rescaled by their producers.
    g = sess.graph
    assert len({g.tensors[t].quant for t in mms[0].inputs}) == 1
    assert all(n.inputs == ["x_QuantizeLinear_Output"] for n in g.nodes if n.op == "clamp")


def test_concat_read_by_a_non_matmul_keeps_its_copy() -> None:
    m = Model(4)
    x = m.input("x", (20, 8))
    h = m.op("Relu", [m.op("Gemm", [x, m.weight((8, 16)), m.weight((16,), 0.1)])])
    cat = m.op("Concat", [x, h], axis=1)
    y = m.op("Gemm", [cat, m.weight((24, 6)), m.weight((6,), 0.1)])
    z = m.op("Relu", [cat])
    sess = _exact_vs_onnxruntime(m.build([y, z]))
    assert [n for n in sess.graph.nodes if n.op == "concat"]
    assert not [n for n in sess.graph.nodes if "k_parts" in n.attrs]


def _heads_model(rows: int, c_in: int, widths: list[int], seed: int = 0, relu=()):
    """Several Gemm heads reading one hidden state (NeRF: density 1, feature 256)."""
    m = Model(seed)
    x = m.input("x", (rows, c_in))
    h = m.op("Relu", [m.op("Gemm", [x, m.weight((c_in, 32)), m.weight((32,), 0.1)])])
    outs = []
    for i, w in enumerate(widths):
        y = m.op("Gemm", [h, m.weight((32, w)), m.weight((w,), 0.1)])
        outs.append(m.op("Relu", [y]) if i in relu else y)
    return m.build(outs)


@pytest.mark.parametrize("widths,relu", [([1, 20], (1,)), ([3, 1, 16], ()), ([17, 2], (0, 1))])
def test_sibling_heads_fused_match_onnxruntime(widths, relu) -> None:
    model = _heads_model(45, 10, widths, seed=len(widths), relu=relu)
    sess = _exact_vs_onnxruntime(model, seed=2)
    fused = [n for n in sess.graph.nodes if "out_parts" in n.attrs]
    assert len(fused) == 1 and len(fused[0].outputs) == len(widths)
    parts = fused[0].attrs["out_parts"]
    assert [p["channels"] for p in parts] == widths
    assert all(p["offset"] % 16 == 0 for p in parts)               # one chunk per sibling start
    if 0 < len(relu) < len(widths):   # a Relu head next to a plain one: own zero points
        assert len({(p["zero_point"], tuple(p["clamp"])) for p in parts}) > 1
    feeds = {"x": np.random.default_rng(1).standard_normal((45, 10)).astype(np.float32)}
    assert programs_match_ir(sess, feeds) >= 2


def test_nerf_skip_and_heads_lowering() -> None:
    """The documented NeRF structure at a small size: the skip concat is split-K, the density
    head is fused with the feature layer, the view concat is split-K too; int8 outputs equal
    onnxruntime's and the programs the IR's."""
    model = nerf.nerf_mlp(batch=64, depth=8, width=32, skips=(4,), seed=1)
    sess = _exact_vs_onnxruntime(model, seed=4)
    g = sess.graph
    split = {n.name: n.attrs["k_parts"] for n in g.nodes if "k_parts" in n.attrs}
    assert split == {"pts.5_node": [63, 32], "views.0_node": [32, 27]}
    [fused] = [n for n in g.nodes if "out_parts" in n.attrs]
    assert sorted(p["channels"] for p in fused.attrs["out_parts"]) == [1, 32]
    # The encodings' rescales (graph inputs) ride along the first matmuls, one each.
    order = [n.name for n in g.nodes]
    rides = {n.name: n.attrs.get("ride_with") for n in g.nodes if n.op == "clamp"}
    assert rides and all(r is not None and order.index(r) == order.index(k) + 1
                         for k, r in rides.items())
    assert len(set(rides.values())) == len(rides)
    rng = np.random.default_rng(0)
    feeds = {"x_enc": rng.standard_normal((64, 63)).astype(np.float32),
             "d_enc": rng.standard_normal((64, 27)).astype(np.float32)}
    assert programs_match_ir(sess, feeds) >= 10


def test_split_k_part_used_elsewhere_is_rescaled_not_moved() -> None:
    """The hidden state is also a graph output: its producer keeps writing it in its own
    quantization and a rescale copy (of that part only) feeds the split-K matmul."""
    m = Model(6)
    x = m.input("x", (30, 10))
    h = m.op("Relu", [m.op("Gemm", [x, m.weight((10, 24)), m.weight((24,), 0.1)])])
    cat = m.op("Concat", [h, x], axis=1)
    y = m.op("Gemm", [cat, m.weight((34, 12)), m.weight((12,), 0.1)])
    sess = _exact_vs_onnxruntime(m.build([y, h]), seed=6)
    g = sess.graph
    [mm] = [n for n in g.nodes if "k_parts" in n.attrs]
    assert mm.attrs["k_parts"] == [24, 10]
    h_name = next(n.outputs[0] for n in g.nodes if n.op == "conv" and n is not mm)
    assert h_name in g.outputs or any(h_name in n.inputs for n in g.nodes if n.device == "host")
    if g.tensors[h_name].quant != g.tensors[mm.inputs[0]].quant:
        [copy] = [n for n in g.nodes if n.op == "clamp" and n.inputs == [h_name]]
        assert copy.outputs == [mm.inputs[0]]
    feeds = {"x": np.random.default_rng(2).standard_normal((30, 10)).astype(np.float32)}
    assert programs_match_ir(sess, feeds) >= 3


def test_rescale_rides_along_and_saves_cycles() -> None:
    """A skip concat of a wide encoded input: its rescale runs beside the first matmuls
    (fewer cycles than the same program with the rescale alone between two layers)."""
    from npu.compiler import pipeline

    model = _skip_model(2048, 63, 64, 64, seed=7)
    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((2048, 63)).astype(np.float32)} for _ in range(2)]
    feeds = {"x": rng.standard_normal((2048, 63)).astype(np.float32)}
    cycles = {}
    for ride in (True, False):
        saved = pipeline.PASSES[:]
        if not ride:   # the same lowering with the rescale's ride removed after split-K
            def no_ride(g, c, o):
                for n in g.nodes:
                    n.attrs.pop("ride_with", None)
                return g
            at = [name for name, _ in saved].index("split_k") + 1
            pipeline.PASSES.insert(at, ("no_ride", no_ride))
        try:
            sess = InferenceSession(model, "npu16", calibration=calib)
        finally:
            pipeline.PASSES[:] = saved
        sess.run(None, feeds)
        cycles[ride] = sess.cycles
        ref = run_graph(sess.graph, feeds)
        out = sess.graph.outputs[0]
        np.testing.assert_allclose(sess.run(None, feeds)[0], ref[out], rtol=0, atol=0)
    assert cycles[True] < cycles[False]


def test_split_k_nchw_fire_module() -> None:
    """SqueezeNet's fire module: concat(expand1x1, expand3x3) read by the next 1x1 squeeze
    convolution (NHWC tensors, 16 + 24 channels) and a strided 1x1 conv."""
    m = Model(8)
    x = m.op("Relu", [m.conv(m.input("x", (1, 8, 7, 7)), 8, 8, 1)])
    a = m.op("Relu", [m.conv(x, 8, 16, 1)])
    b = m.op("Relu", [m.conv(x, 8, 24, 3, pads=[1, 1, 1, 1])])
    cat = m.op("Concat", [a, b], axis=1)
    y1 = m.conv(cat, 40, 8, 1)
    y2 = m.conv(cat, 40, 5, 1, strides=[2, 2])
    sess = _exact_vs_onnxruntime(m.build([y1, y2]), seed=8)
    mms = [n for n in sess.graph.nodes if "k_parts" in n.attrs]
    assert len(mms) == 2 and all(n.attrs["k_parts"] == [16, 24] for n in mms)
    assert not [n for n in sess.graph.nodes if n.op in ("concat", "copy")]
    feeds = {"x": np.random.default_rng(4).standard_normal((1, 8, 7, 7)).astype(np.float32)}
    assert programs_match_ir(sess, feeds) >= 4
