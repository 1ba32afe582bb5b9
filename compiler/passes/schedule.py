"""Schedule: on-chip buffers of every NPU node and the order work is issued in.

Each node gets its SPAD and ACC buffers (input blocks, weights, output and operand slots, ACC
accumulation slots, VECTOR parameter rows) from its plan. Consecutive nodes allocate from
opposite ends of SPAD and ACC, so the next layer's weights and parameters can be prefetched
while the current layer still works in its own buffers (the hazard tracker of
:mod:`npu.compiler.stream` would otherwise make the prefetch wait).

The issue order itself is software-pipelined by :mod:`npu.compiler.passes.emit`: the loads of
work item *i+1* are placed before the matmuls of item *i*, its vector work and stores right
after them, and the next layer's weights before the current layer's last item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Node
from npu.compiler.passes.tile import (
    AGG_SLOTS,
    AggPlan,
    ConvPlan,
    EltPlan,
    GatherPlan,
    PoolPlan,
    ReorderPlan,
)
from npu.isa import VECTOR_PARAM_ROWS, NPUConfig

__all__ = ["Buffers", "schedule", "node_buffers", "avg_divisors"]


@dataclass
class Buffers:
    """Named on-chip regions of one node: name -> (first row, rows)."""

    spad: dict[str, tuple[int, int]] = field(default_factory=dict)
    acc: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        s = " ".join(f"{k}@{a}+{n}" for k, (a, n) in self.spad.items())
        a = " ".join(f"{k}@{a}+{n}" for k, (a, n) in self.acc.items())
        return f"SPAD[{s}] ACC[{a}]"


def avg_divisors(plan: ConvPlan, count_include_pad: int) -> np.ndarray:
    """Window element count per output pixel [oh, ow] used as the average's divisor."""
    if count_include_pad:
        return np.full((plan.oh, plan.ow), plan.kh * plan.kw, dtype=np.int64)
    pt, pl, _, _ = plan.pads

    def count(n_out: int, size: int, k: int, s: int, d: int, p: int) -> np.ndarray:
        o = np.arange(n_out)[:, None] * s - p + np.arange(k)[None, :] * d
        return ((o >= 0) & (o < size)).sum(axis=1)

    ys = count(plan.oh, plan.h, plan.kh, plan.sy, plan.dy, pt)
    xs = count(plan.ow, plan.w, plan.kw, plan.sx, plan.dx, pl)
    return ys[:, None] * xs[None, :]


def align(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a`` (slots start on hazard-tracking blocks)."""
    return -(-x // a) * a


def node_buffers(node: Node, cfg: NPUConfig) -> tuple[list[tuple[str, int]],
                                                       list[tuple[str, int]]]:
    """(SPAD regions, ACC regions) a node needs, as (name, rows) lists. Every slot is
    rounded up to a multiple of ``cols`` rows, the hazard-tracking block."""
    plan = node.plan
    r = cfg.rows
    operands = [s for s in node.attrs.get("epilogue", []) if s.other is not None]
    if isinstance(plan, ConvPlan):
        mt = align(plan.oh_t * plan.ow_t, r)
        if plan.resident:
            w_rows = max(1, len(plan.tiles)) * r
        else:
            w_rows = plan.w_ring * plan.w_sub * r
        spad = [("in", plan.in_slots * align(plan.block_rows, r)), ("w", w_rows),
                ("out", 2 * mt)]
        spad += [(f"op{i}", 2 * mt) for i in range(len(operands))]
        if plan.kind == "avgpool":
            ndiv = len(np.unique(avg_divisors(plan, node.attrs.get("count_include_pad", 0))))
            par = VECTOR_PARAM_ROWS * ndiv
        else:
            par = VECTOR_PARAM_ROWS * (plan.coc if plan.params_resident else 2)
        return spad, [("acc", 2 * mt), ("par", align(par, r))]
    if isinstance(plan, AggPlan):
        out = 2 * plan.fg * plan.mt
        w = plan.fg * -(-plan.k // r) * r if plan.x_resident else AGG_SLOTS * plan.fg * r
        spad = [("w", w), ("a", AGG_SLOTS * plan.mt), ("out", out)]
        spad += [(f"op{i}", out) for i in range(len(operands))]
        return spad, [("acc", out), ("par", align(VECTOR_PARAM_ROWS, r))]
    if isinstance(plan, PoolPlan):
        mt = align(plan.oh_t * plan.ow_t, r)
        spad = [("in", 2 * align(plan.br * plan.bc, r)), ("out", 2 * mt)]
        spad += [(f"op{i}", 2 * mt) for i in range(len(operands))]
        return spad, []
    if isinstance(plan, EltPlan):
        mt = align(plan.oh_t * plan.ow_t, r)
        spad = [("a", 2 * mt)]
        if node.op == "add":
            spad.append(("b", 2 * mt))
        spad.append(("out", 2 * mt))
        spad += [(f"op{i}", 2 * mt) for i in range(len(operands) - (node.op == "add"))]
        return spad, []
    if isinstance(plan, GatherPlan):
        return [("g", 2 * align(plan.block, r))], []
    if isinstance(plan, ReorderPlan):
        return [("r", 2 * align(plan.cb * plan.pixels, r))], []
    return [], []


def _place(regions: list[tuple[str, int]], size: int, top: bool, what: str,
           node: Node, blk: int) -> dict[str, tuple[int, int]]:
    regions = [(name, align(n, blk)) for name, n in regions]
    total = sum(n for _, n in regions)
    if total > size:
        raise CompileError(f"needs {total} {what} rows, the machine has {size}", node.name,
                           node.onnx_op)
    out: dict[str, tuple[int, int]] = {}
    pos = (size - total) // blk * blk if top else 0
    for name, n in regions:
        out[name] = (pos, n)
        pos += n
    return out


def schedule(graph: Graph, config: NPUConfig) -> Graph:
    """Give every NPU node its on-chip buffers (``node.attrs['buffers']``)."""
    for seg in graph.segments:
        k = 0
        for name in seg.nodes:
            node = graph.node(name)
            spad, acc = node_buffers(node, config)
            if not spad and not acc:
                continue
            top = bool(k % 2)
            node.attrs["buffers"] = Buffers(
                _place(spad, config.spad_rows, top, "SPAD", node, config.rows),
                _place(acc, config.acc_rows, top, "ACC", node, config.rows))
            k += 1
    return graph
