"""Each IR pass on its own: legalize, fuse, layout, partition, tile, schedule, allocate."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from opmodels import Model, feeds

from npu import numerics
from npu.compiler.errors import CompileError
from npu.compiler.frontend import prepare_model
from npu.compiler.ir import CHANNEL_LAST, ROWS, Graph, geometry
from npu.compiler.passes import legalize
from npu.compiler.passes.allocate import tensor_bytes
from npu.compiler.passes.tile import ConvPlan
from npu.compiler.pipeline import PASSES, compile_model
from npu.compiler.quantize import quantize_model
from npu.isa import get_config


def run_passes(model: onnx.ModelProto, upto: str, config: str = "npu16",
               **options) -> Graph:
    """The IR after pass ``upto`` (legalize, fuse, layout, ..., emit)."""
    qdq = prepare_model(quantize_model(prepare_model(model),
                                       feeds(model, np.random.default_rng(0), 2)))
    graph = legalize.legalize(qdq)
    if upto == "legalize":
        return graph
    cfg = get_config(config)
    for name, fn in PASSES:
        graph = fn(graph, cfg, options)
        if name == upto:
            return graph
    raise ValueError(upto)


def _residual() -> onnx.ModelProto:
    m = Model(1)
    x = m.input("x", (1, 16, 8, 8))
    y = m.op("Relu", [m.conv(x, 16, 16, 3, pads=[1, 1, 1, 1])])
    y = m.conv(y, 16, 16, 1)
    y = m.op("Relu", [m.op("Add", [y, x])])
    return m.build([m.conv(y, 16, 8, 1)])


def _fire(head_k: int = 1) -> onnx.ModelProto:
    m = Model(2)
    x = m.op("Relu", [m.conv(m.input("x", (1, 8, 6, 6)), 8, 8, 1)])
    a = m.op("Relu", [m.conv(x, 8, 16, 1)])
    b = m.op("Relu", [m.conv(x, 8, 24, 3, pads=[1, 1, 1, 1])])
    pad = (head_k - 1) // 2
    return m.build([m.conv(m.op("Concat", [a, b], axis=1), 40, 8, head_k, pads=[pad] * 4)])


def test_legalize_conv_fold_and_host_reason() -> None:
    m = Model(3)
    x = m.input("x", (1, 4, 5, 5))
    y = m.op("Softmax", [m.conv(x, 4, 6, 3, pads=[1, 1, 1, 1])], axis=1)
    model = m.build([y])
    qdq = prepare_model(quantize_model(prepare_model(model),
                                       feeds(model, np.random.default_rng(0), 2)))
    g = legalize.legalize(qdq)
    conv = next(n for n in g.nodes if n.op == "conv")
    xq = g.tensors[conv.inputs[0]].quant
    yq = g.tensors[conv.outputs[0]].quant
    w = conv.attrs["weight"].astype(np.int64)
    # The input zero point is folded into the bias: bias = b_q - zx * sum(w).
    qdq_bias = conv.attrs["bias"] + xq.zero_point * w.reshape(6, -1).sum(axis=1)
    assert np.abs(qdq_bias).max() < 1 << 31
    # VECTOR fp32 mode: the multiplier row holds onnxruntime's float32 requantization scales
    # x_scale * w_scale / y_scale (computed in that order in float32), bit for bit.
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in qdq.graph.initializer}
    wdq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear"
               and consts.get(n.input[0], np.zeros(0)).ndim == 4)
    ws = consts[wdq.input[1]].astype(np.float32)
    want = np.float32(xq.scale) * ws / np.float32(yq.scale)
    assert conv.attrs["fp32"] == 1 and not np.any(conv.attrs["shift"])
    np.testing.assert_array_equal(numerics.f32_scales(conv.attrs["mult"]), want)
    soft = next(n for n in g.nodes if n.onnx_op == "Softmax")
    assert soft.device == "host" and "Softmax" in soft.reason


def test_fuse_residual_add_into_conv() -> None:
    g = run_passes(_residual(), "fuse")
    ops = [n.op for n in g.nodes if n.device == "npu"]
    assert ops == ["conv", "conv", "conv"]           # the Add became an epilogue step
    fused = g.nodes[[n.op for n in g.nodes].index("conv") + 1]
    (step,) = fused.attrs["epilogue"]
    assert step.kind == "add" and step.other in g.inputs + [
        o for n in g.nodes for o in n.outputs]
    # The Relu after the add: a clamp at the zero point (or ORT folded it into the range).
    assert step.clamp_min == step.zero_point or step.zero_point == -128


def test_fuse_concat_writes_in_place() -> None:
    # (Read by a 3x3 conv: a concat read only by 1x1 convs is split-K, see test_mlp.py.)
    g = run_passes(_fire(head_k=3), "fuse")
    concat = next(n for n in g.nodes if n.op == "concat")
    views = [g.tensors[t].view_of for t in concat.inputs]
    assert views == [(concat.outputs[0], 0), (concat.outputs[0], 16)]
    assert not any(n.op == "copy" for n in g.nodes)


def test_fuse_concat_of_inputs_copies() -> None:
    m = Model(5)
    y = m.op("Concat", [m.input("a", (1, 3, 2, 2)), m.input("b", (1, 5, 2, 2))], axis=1)
    g = run_passes(m.build([m.conv(y, 8, 4, 3, pads=[1, 1, 1, 1])]), "fuse")
    assert [n.op for n in g.nodes if n.device == "npu"][:2] == ["copy", "copy"]


def test_layout_nhwc_alias_and_weight_permutation() -> None:
    m = Model(6)
    x = m.op("Relu", [m.conv(m.input("x", (1, 4, 3, 3)), 4, 8, 1)])
    f = m.op("Flatten", [x])
    g = run_passes(m.build([m.op("Gemm", [f, m.weight((5, 72))], transB=1)]), "layout")
    conv = next(n for n in g.nodes if n.op == "conv" and n.attrs["kind"] == "conv")
    assert g.tensors[conv.outputs[0]].layout == CHANNEL_LAST
    flat = next(n for n in g.nodes if n.op == "reshape")
    assert g.tensors[flat.outputs[0]].alias_of == flat.inputs[0]
    gemm = next(n for n in g.nodes if n.attrs.get("kind") == "dense")
    assert gemm.attrs.get("permuted_input")
    assert g.tensors[gemm.inputs[0]].layout == ROWS


def test_layout_reorder_when_order_changes() -> None:
    m = Model(7)
    x = m.op("Relu", [m.conv(m.input("x", (1, 4, 3, 3)), 4, 8, 1)])
    g = run_passes(m.build([m.op("Flatten", [x])]), "layout")
    reorder = next(n for n in g.nodes if n.op == "reorder")
    assert reorder.attrs["to"] == ROWS and reorder.device == "npu"


def test_partition_segments_and_strict() -> None:
    m = Model(8)
    x = m.conv(m.input("x", (1, 4, 5, 5)), 4, 8, 1)
    y = m.op("Sigmoid", [x])              # the NPU has no Sigmoid: host, between two segments
    model = m.build([m.conv(y, 8, 4, 1)])
    g = run_passes(model, "partition")
    assert len(g.segments) == 2
    sig = next(n for n in g.nodes if n.onnx_op == "Sigmoid")
    assert sig.device == "host" and sig.attrs["phase"] == 1
    with pytest.raises(CompileError, match="strict mode.*Sigmoid"):
        run_passes(model, "partition", strict=True)


@pytest.mark.parametrize("config", ["npu4", "npu16", "npu128"])
def test_tile_plans_fit_the_machine(config: str) -> None:
    g = run_passes(_residual(), "schedule", config)
    cfg = get_config(config)
    for node in g.nodes:
        if node.device != "npu" or node.plan is None:
            continue
        buf = node.attrs["buffers"]
        for regions, size in ((buf.spad, cfg.spad_rows), (buf.acc, cfg.acc_rows)):
            spans = sorted(regions.values())
            assert all(a % cfg.rows == 0 and a + n <= size for a, n in spans)
            assert all(a0 + n0 <= a1 for (a0, n0), (a1, _) in zip(spans, spans[1:]))


def test_tile_packs_rgb_and_splits_k_on_small_machines() -> None:
    m = Model(9)
    y = m.conv(m.input("x", (1, 3, 32, 32)), 3, 16, 7, strides=[2, 2], pads=[3, 3, 3, 3])
    y = m.conv(m.op("Relu", [y]), 16, 64, 3, pads=[1, 1, 1, 1])
    model = m.build([m.conv(m.op("Relu", [y]), 64, 512, 1)])
    g = run_passes(model, "tile", "npu16")
    plans = [n.plan for n in g.nodes if isinstance(n.plan, ConvPlan)]
    assert plans[0].mode == "packed"                 # kw*C bytes in the reduction dimension
    assert plans[0].cj * plans[0].kh < 1 * 7 * 7     # fewer K tiles than one per offset
    g4 = run_passes(model, "tile", "npu4")
    big = [n.plan for n in g4.nodes if isinstance(n.plan, ConvPlan)][-1]
    assert big.kgroups >= 1 and big.block_rows * big.in_slots <= get_config("npu4").spad_rows


def test_schedule_alternates_ends() -> None:
    g = run_passes(_residual(), "schedule")
    starts = [min(a for a, _ in n.attrs["buffers"].spad.values())
              for n in g.nodes if "buffers" in n.attrs]
    assert starts[0] == 0 and starts[1] > 0


def test_allocate_reuses_dram_without_overlap() -> None:
    m = Model(10)
    y = m.input("x", (1, 16, 16, 16))
    for _ in range(6):
        y = m.op("Relu", [m.conv(y, 16, 16, 3, pads=[1, 1, 1, 1])])
    g = run_passes(m.build([y]), "allocate")
    seg = g.segments[0]
    placed = {}
    order = {name: i for i, name in enumerate(seg.nodes)}
    for name in seg.nodes:
        node = g.node(name)
        for t in node.inputs + node.outputs:
            tt = g.tensors[t]
            if tt.place is not None and not tt.is_const:
                lo = tt.place.addr - (tt.place.pad[0] * tt.place.row_stride(geometry(tt)[2])
                                      + tt.place.pad[1] * tt.place.pixel_stride)
                span = (lo, lo + tensor_bytes(tt, tt.place.pad))
                first = min(order.get(placed.get(t, (None, None, name))[2], 99), order[name])
                placed[t] = (span, first, name)
    total = sum(b - a for (a, b), _, _ in placed.values())
    dyn = seg.stats["dram_bytes"] - seg.stats["const_end"]
    assert dyn < total                              # buffers were reused
    life = {}
    for name in seg.nodes:
        node = g.node(name)
        for t in node.inputs + node.outputs:
            if t in placed:
                lo, hi = life.get(t, (order[name], order[name]))
                life[t] = (min(lo, order[name]), max(hi, order[name]))
    for (t1, (s1, _, _)), (t2, (s2, _, _)) in itertools.combinations(placed.items(), 2):
        l1, l2 = life[t1], life[t2]
        if l1[1] < l2[0] or l2[1] < l1[0]:
            continue
        assert s1[1] <= s2[0] or s2[1] <= s1[0], (t1, t2)


def test_dump_ir_after_every_pass() -> None:
    seen = []
    compile_model(_fire(), "npu16", 2, dump=lambda name, text: seen.append((name, text)))
    assert [name for name, _ in seen] == ["legalize"] + [name for name, _ in PASSES]
    emitted = dict(seen)["emit"]
    assert "instructions" in emitted and "plan:" in emitted and "SPAD[" in emitted
