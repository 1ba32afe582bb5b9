"""Allocate: DRAM planning of every segment, with lifetime-based buffer reuse.

Per segment the DRAM holds, from address 0:

1. constants (weight tiles, VECTOR parameter rows, gather tables and indices) as program
   segments, loaded with the program;
2. *static* tensors: inputs of packed convolutions, which carry a physical border of the input
   zero point (initialized by a program segment, so never reused);
3. every other tensor (segment inputs, intermediates, segment outputs) placed first-fit by
   lifetime: a tensor lives from the node producing it (inputs: from the start) to its last
   consumer (outputs: to the end), and tensors whose lifetimes do not overlap share bytes.

Concat inputs written in place are views of the concat output (offset channels, the output's
pixel stride); reshape outputs alias their input's bytes.
"""

from __future__ import annotations

import numpy as np

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Placement, Segment, Tensor, geometry
from npu.compiler.passes.tile import ConvPlan
from npu.isa import NPUConfig

__all__ = ["allocate", "ALIGN", "tensor_bytes"]

#: DRAM alignment of every buffer (the hazard tracker's DRAM block size).
ALIGN = 64


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def tensor_bytes(t: Tensor, pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> int:
    """Bytes of an NPU tensor stored with physical padding ``pad`` (top, left, bottom, right)."""
    n, h, w, c = geometry(t)
    # Integer index tensors (Gather) are stored as int32 whatever their ONNX type (int64).
    itemsize = 4 if t.dtype in ("int32", "int64") else 1
    return n * (h + pad[0] + pad[2]) * (w + pad[1] + pad[3]) * c * itemsize


def _requested_pads(graph: Graph, seg: Segment) -> dict[str, tuple[tuple[int, ...], int]]:
    """Tensors that packed convolutions read with a physical border: name -> (pads, value)."""
    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for name in seg.nodes:
        node = graph.node(name)
        plan = node.plan
        if isinstance(plan, ConvPlan) and plan.mode == "packed":
            x = graph.tensors[node.inputs[0]]
            zp = x.quant.zero_point if x.quant else 0
            pads = plan.pads
            if x.name in out:
                old, val = out[x.name]
                if val != zp:
                    raise CompileError(f"tensor {x.name!r} padded with two values")
                pads = tuple(max(a, b) for a, b in zip(old, pads))
            out[x.name] = (pads, zp)
    return out


def allocate(graph: Graph, config: NPUConfig) -> Graph:
    """Place every tensor of every segment in that segment's DRAM (``Tensor.place``) and lay out
    the constants of its nodes (``node.attrs['consts']``: name -> (address, bytes))."""
    from npu.compiler.passes.emit import node_constants

    for seg in graph.segments:
        top = 0
        consts: dict[str, tuple[int, bytes]] = {}
        for name in seg.nodes:
            node = graph.node(name)
            blobs = node_constants(node, graph, config)
            placed = {}
            for key, data in blobs.items():
                placed[key] = (top, data)
                top = _align(top + len(data))
            node.attrs["consts"] = placed
            consts.update({f"{name}/{k}": v for k, v in placed.items()})
        seg.stats["const_end"] = top     # below: constants only (never written)
        order = {name: i for i, name in enumerate(seg.nodes)}
        end_of_seg = len(seg.nodes)
        pads = _requested_pads(graph, seg)
        # Lifetimes of the tensors this segment stores (views/aliases fold into their base).
        life: dict[str, list[int]] = {}

        def touch(t: str, at: int, life: dict[str, list[int]] = life) -> None:
            lo_hi = life.setdefault(_base(graph, t), [at, at])
            lo_hi[0] = min(lo_hi[0], at)
            lo_hi[1] = max(lo_hi[1], at)

        for t in seg.inputs:
            touch(t, -1)
        for name in seg.nodes:
            node = graph.node(name)
            i = order[name]
            for t in node.inputs + [s.other for s in node.attrs.get("epilogue", [])
                                    if s.other is not None]:
                if t in graph.tensors and not graph.tensors[t].is_const:
                    touch(t, i)
            for t in node.outputs:
                touch(t, i)
            ride = node.attrs.get("ride_with")
            if ride in order:   # runs beside that later node (see passes.mlp): inputs live on
                for t in node.inputs:
                    if t in graph.tensors and not graph.tensors[t].is_const:
                        touch(t, order[ride])
        for t in seg.outputs:
            touch(t, end_of_seg)
        # Static (padded) tensors first, right after the constants.
        static_bytes: dict[str, bytes] = {}
        placements: dict[str, Placement] = {}
        for t, (pad, value) in pads.items():
            b = _base(graph, t)
            if b != t:
                raise CompileError(f"internal: padded tensor {t!r} is a view or alias")
            tt = graph.tensors[t]
            size = tensor_bytes(tt, pad)
            _, h, w, c = geometry(tt)
            placements[t] = Placement(top + (pad[0] * (w + pad[1] + pad[3]) + pad[1]) * c, c,
                                      tuple(pad), value, buffer=t)
            if t not in seg.inputs:   # the host writes an input's border itself
                static_bytes[t] = bytes(np.full(size, value, dtype=np.int8).view(np.uint8))
                consts[f"pad/{t}"] = (top, static_bytes[t])
            top = _align(top + size)
            life.pop(t, None)
        # First-fit by lifetime for the rest.
        live: list[tuple[int, int, int, int]] = []   # (addr, end_addr, start, stop)
        dyn_base = top
        for t in sorted(life, key=lambda k: (life[k][0], -tensor_bytes(graph.tensors[k]))):
            tt = graph.tensors[t]
            size = _align(max(1, tensor_bytes(tt)))
            s0, s1 = life[t]
            addr = dyn_base
            for a0, a1, l0, l1 in sorted(live):
                overlap_time = not (s1 < l0 or l1 < s0)
                if overlap_time and addr < a1 and a0 < addr + size:
                    addr = _align(a1)
            live.append((addr, addr + size, s0, s1))
            _, _, _, c = geometry(tt)
            placements[t] = Placement(addr, c, buffer=t)
            top = max(top, addr + size)
        for t, p in placements.items():
            graph.tensors[t].place = p
        # Views and aliases get their base's placement.
        for t in _segment_tensors(graph, seg):
            tt = graph.tensors[t]
            b = _base(graph, t)
            if b == t or b not in placements:
                continue
            bp = placements[b]
            if tt.view_of is not None:
                off = _view_offset(graph, t)
                tt.place = Placement(bp.addr + off, tt.view_stride or bp.pixel_stride, bp.pad,
                                     bp.pad_value, buffer=b)
            else:
                _, _, _, c = geometry(tt)
                tt.place = Placement(bp.addr, c, buffer=b)
        # A tensor crossing segments has one placement per segment: emit restores this
        # segment's before building its program (Tensor.place keeps the last one).
        seg.stats["places"] = {t: graph.tensors[t].place for t in _segment_tensors(graph, seg)
                               if graph.tensors[t].place is not None}
        seg.stats["dram_bytes"] = max(ALIGN, _align(top))
        seg.stats["const_bytes"] = sum(len(d) for _, d in consts.values())
        seg.stats["consts"] = consts
    return graph


def _base(graph: Graph, t: str) -> str:
    """The tensor whose bytes ``t`` uses (itself, or the base of its view/alias chain)."""
    tt = graph.tensors[t]
    for _ in range(64):
        nxt = tt.view_of[0] if tt.view_of is not None else tt.alias_of
        if nxt is None:
            return tt.name
        tt = graph.tensors[nxt]
    raise CompileError(f"internal: alias cycle at {t!r}")


def _view_offset(graph: Graph, t: str) -> int:
    off = 0
    tt = graph.tensors[t]
    while tt.view_of is not None:
        off += tt.view_of[1]
        tt = graph.tensors[tt.view_of[0]]
    return off


def _segment_tensors(graph: Graph, seg: Segment) -> list[str]:
    names: list[str] = list(seg.inputs)
    for name in seg.nodes:
        node = graph.node(name)
        names += node.inputs + node.outputs
        names += [s.other for s in node.attrs.get("epilogue", []) if s.other is not None]
    return [n for n in dict.fromkeys(names) if n in graph.tensors
            and not graph.tensors[n].is_const]
