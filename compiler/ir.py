"""The compiler's intermediate representation: a small graph of NPU-level operations.

A :class:`Graph` holds :class:`Tensor` values and :class:`Node` operations in topological order.
Every NPU tensor is int8 with a per-tensor :class:`Quant` (scale, zero point) and is seen by the
machine as *rows of channels*: a 4-D ``[N, C, H, W]`` tensor is stored channel-last (NHWC,
:data:`CHANNEL_LAST`), any other rank row-major with the last axis as channels (:data:`ROWS`).
:func:`geometry` gives the (N, H, W, C) view both layouts share.

NPU operations (``Node.op``):

``conv``
    convolution / Gemm / MatMul with int8 weights, int32 bias (activation zero point folded
    in), per-channel requantization (multiplier, shift), output zero point and clamp, and an
    *epilogue* of :class:`Step` s (residual add, rescale) run on the vector unit.
``add``      rescaled elementwise add of two tensors (ELTWISE ADD), then its epilogue.
``clamp``    rescale + clamp of one tensor (Relu/Clip between different scales).
``maxpool``  ELTWISE MAX over the window offsets.
``avgpool``  MATMUL with identity weights over the window offsets, then VECTOR with 1/k.
``concat``   channel concatenation; producers write straight into the output (views).
``copy``     LOAD (+ rescale) + STORE of one tensor into a view (concat inputs not written
             in place).
``reshape``  a change of shape that keeps the bytes (an alias).
``reorder``  NHWC <-> row-major byte permutation by DMA (a reshape that changes the order).
``gather``   GATHER of table rows by an index tensor.
``host``     one ONNX node run on the host (numpy via ``onnx.reference``), in float or int.

Passes annotate nodes (``segment``, ``plan``) and tensors (``place``) as they go;
:func:`dump` prints all of it (``npu compile --dump-ir``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CHANNEL_LAST", "ROWS", "Quant", "Step", "Placement", "Tensor", "Node", "Segment",
           "Graph", "geometry", "dump", "NPU_OPS"]

#: Layout of 4-D NPU tensors in DRAM: NHWC (ONNX axis 1 moved last).
CHANNEL_LAST = "NHWC"
#: Layout of other NPU tensors: row-major, the last ONNX axis is the channel axis.
ROWS = "rows"
#: Operations the NPU executes.
NPU_OPS = ("conv", "add", "clamp", "maxpool", "avgpool", "concat", "copy", "reshape", "gather",
           "reorder")


@dataclass(frozen=True)
class Quant:
    """Per-tensor int8 quantization: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    def __str__(self) -> str:
        return f"s={self.scale:.6g},z={self.zero_point}"


@dataclass
class Step:
    """One vector-unit operation applied to a tile after it is in SPAD.

    ``kind`` is ``"add"`` (``other`` is the second operand tensor) or ``"rescale"`` (``b_mult``
    0). Computes ``clamp(round_half_even(((a - a_zero)*a_mult + (b - b_zero)*b_mult) /
    2**shift) + zero_point, clamp_min, clamp_max)`` as ELTWISE ADD does.
    """

    kind: str
    a_zero: int
    a_mult: int
    shift: int
    zero_point: int
    clamp_min: int = -128
    clamp_max: int = 127
    other: str | None = None
    b_zero: int = 0
    b_mult: int = 0

    def __str__(self) -> str:
        s = f"{self.kind}(a: z={self.a_zero} m={self.a_mult}"
        if self.other is not None:
            s += f"; b={self.other} z={self.b_zero} m={self.b_mult}"
        return s + f"; >>{self.shift} +{self.zero_point} [{self.clamp_min},{self.clamp_max}])"


@dataclass
class Placement:
    """Where a tensor lives in a segment's DRAM.

    ``addr`` is the byte address of element (n=0, h=0, w=0, c=0); ``pixel_stride`` the bytes
    between neighbouring pixels (the base tensor's channel count for a concat view); ``pad``
    a physical border (top, left, bottom, right) of ``pad_value`` bytes around each image,
    which packed convolutions read instead of padding in SPAD.
    """

    addr: int
    pixel_stride: int
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    pad_value: int = 0
    buffer: str = ""

    def row_stride(self, w: int) -> int:
        return (w + self.pad[1] + self.pad[3]) * self.pixel_stride

    def image_stride(self, h: int, w: int) -> int:
        return (h + self.pad[0] + self.pad[2]) * self.row_stride(w)

    def __str__(self) -> str:
        s = f"@{self.addr} px={self.pixel_stride}"
        if any(self.pad):
            s += f" pad={self.pad}/{self.pad_value}"
        return s


@dataclass
class Tensor:
    """A value of the graph. NPU tensors are int8 with ``quant``; host tensors any dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    quant: Quant | None = None
    layout: str = ""
    data: np.ndarray | None = None          # constants
    view_of: tuple[str, int] | None = None  # (base tensor, channel offset): a concat view
    alias_of: str | None = None             # same bytes as this tensor (a reshape)
    split: int | None = None                # ROWS layout: axes [0, split) are rows
    view_stride: int | None = None          # a view's own pixel stride (generic concat)
    place: Placement | None = None

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def __str__(self) -> str:
        s = f"{self.name}: {self.dtype}{list(self.shape)}"
        if self.layout:
            s += f" {self.layout}"
        if self.quant is not None:
            s += f" {self.quant}"
        if self.view_of is not None:
            s += f" view({self.view_of[0]}, c+{self.view_of[1]})"
        if self.alias_of is not None:
            s += f" alias({self.alias_of})"
        if self.place is not None:
            s += f" {self.place}"
        return s


@dataclass
class Node:
    """One operation. ``sources`` are the ONNX node labels it implements (for the report)."""

    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    device: str = "npu"
    sources: list[str] = field(default_factory=list)
    onnx_op: str = ""
    reason: str = ""          # why a node runs on the host
    segment: int = -1
    plan: Any = None

    def __str__(self) -> str:
        head = f"{self.name} = {self.op}({', '.join(self.inputs)}) -> {', '.join(self.outputs)}"
        tags = [self.device]
        if self.segment >= 0:
            tags.append(f"seg{self.segment}")
        if self.onnx_op:
            tags.append(self.onnx_op)
        s = f"{head}  [{' '.join(tags)}]"
        shown = {k: v for k, v in self.attrs.items() if k not in _HIDDEN_ATTRS}
        if shown:
            s += "\n      " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items())
        if self.reason:
            s += f"\n      host because: {self.reason}"
        if self.plan is not None:
            s += f"\n      plan: {self.plan}"
        return s


_HIDDEN_ATTRS = {"onnx_node", "weight", "bias", "mult", "shift", "table", "evaluator",
                 "buffers", "consts"}


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}"
    if isinstance(v, list) and v and isinstance(v[0], Step):
        return "[" + "; ".join(str(s) for s in v) + "]"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


@dataclass
class Segment:
    """A maximal group of NPU nodes compiled into one program."""

    index: int
    nodes: list[str]
    inputs: list[str]
    outputs: list[str]
    program: Any = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    """The whole model: tensors, nodes in topological order, graph inputs and outputs."""

    name: str
    tensors: dict[str, Tensor]
    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    opset: list[tuple[str, int]] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def producer(self) -> dict[str, Node]:
        """Tensor name -> node producing it."""
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        """Tensor name -> nodes reading it (in node order)."""
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        for extra in self._step_inputs():
            out.setdefault(extra[0], []).append(extra[1])
        return out

    def _step_inputs(self) -> list[tuple[str, Node]]:
        res = []
        for n in self.nodes:
            for step in n.attrs.get("epilogue", []):
                if step.other is not None and step.other not in n.inputs:
                    res.append((step.other, n))
        return res

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def fresh(self, hint: str) -> str:
        """A tensor/node name not used yet."""
        used = set(self.tensors) | {n.name for n in self.nodes}
        name, k = hint, 0
        while name in used:
            k += 1
            name = f"{hint}_{k}"
        return name


def geometry(t: Tensor) -> tuple[int, int, int, int]:
    """(N, H, W, C) of an NPU tensor: NCHW -> (N, H, W, C); other ranks -> (1, 1, rows, C)."""
    shape = t.shape
    if t.layout == CHANNEL_LAST:
        if len(shape) == 4:
            return shape[0], shape[2], shape[3], shape[1]
        if len(shape) == 3:  # [N, C, L]
            return shape[0], 1, shape[2], shape[1]
    if not shape:
        return 1, 1, 1, 1
    k = len(shape) - 1 if t.split is None else t.split
    return 1, 1, int(math.prod(shape[:k])), int(math.prod(shape[k:]))


def dump(graph: Graph, title: str = "") -> str:
    """A readable listing of the graph (tensors used, nodes, segments)."""
    lines = [f"== {title or graph.name} =="]
    lines.append("inputs: " + ", ".join(str(graph.tensors[i]) for i in graph.inputs))
    for n in graph.nodes:
        lines.append("  " + str(n).replace("\n", "\n  "))
        for o in n.outputs:
            if o in graph.tensors:
                lines.append(f"      -> {graph.tensors[o]}")
    lines.append("outputs: " + ", ".join(graph.outputs))
    for seg in graph.segments:
        lines.append(f"segment {seg.index}: {len(seg.nodes)} nodes, inputs {seg.inputs}, "
                     f"outputs {seg.outputs}" + (f", {seg.stats}" if seg.stats else ""))
    for note in graph.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
