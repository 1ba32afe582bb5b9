"""Emit: lower every segment's nodes onto the ISA and build its program.

Each NPU node becomes a list of work *items* (see :mod:`npu.compiler.passes.tile`), and every
item has up to five parts, one per engine role:

* ``ldw``: loads that do not depend on earlier layers (weights, VECTOR parameters),
* ``lda``: loads of activations (input blocks with their padding fills, epilogue operands),
* ``ex``: PRELOAD / MATMUL,
* ``vx``: VECTOR requantization, ELTWISE epilogue steps, pooling,
* ``st``: STORE of the finished tile.

The parts are issued software-pipelined (``ldw``/``lda`` of item *i+1* before ``ex`` of item
*i*; ``vx``/``st`` of item *i* right after its ``ex``); loads of a new layer's activations wait
until the previous layer's last store is issued, since they read what it wrote. Inside ``ex``,
streamed weights are refilled through a ring of sub-blocks and a layer's first input block is
loaded chunk by chunk, just ahead of the matmuls that use them. A MaxPool right after the
convolution producing its input rides along with it (:func:`_overlap_pools`). No instruction
carries a token here: :class:`npu.compiler.stream.Stream` derives them from memory footprints.

Convolution (``ConvPlan``): ``std`` blocks are padded input rows in SPAD, laid out
``[chunk][row][col]``, padding filled with the input zero point; kernel offset (ky, kx) of
chunk j is one MATMUL reading the block at ``ky*dy*cols + kx*dx`` with inner stride ``sx`` and
outer stride ``sy*cols`` into the tile's ACC rows. ``rows`` blocks hold the (sub-sampled)
pixels; ``packed`` blocks hold, per reduction chunk j, ``cols`` bytes starting at byte
``16j`` of the ``kw*C``-byte window of each output pixel (read from a physically padded input).

Aggregation (``AggPlan``, ``Y = A X`` with A constant): X's tiles are the weights, the non-zero
blocks of A stream as the inputs into ACC rows that start at the int32 constant ``C`` (see
:mod:`npu.compiler.passes.families`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Node, Placement, Segment, Tensor, geometry
from npu.compiler.passes.schedule import Buffers, align, avg_divisors
from npu.compiler.passes.tile import (
    AGG_SLOTS,
    AggPlan,
    ConvPlan,
    EltPlan,
    GatherPlan,
    PoolPlan,
    ReorderPlan,
)
from npu.compiler.qmath import pool_scale, requant_params
from npu.compiler.stream import Stream
from npu.isa import EltFunc, NPUConfig
from npu.numerics import INT8_MIN
from npu.program import Binding, Program
from npu.program import Segment as DramSegment

__all__ = ["emit", "emit_segment", "node_constants"]

_ELT_MAX_N = 4095     # ELTWISE n_inner / n_outer are 12-bit fields
_STREAM_AHEAD = 4     # input chunks loaded ahead of the matmuls in a layer's first item


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

def _conv_params(node: Node, plan: ConvPlan, graph: Graph, cfg: NPUConfig) -> np.ndarray:
    """[rows, cols] int32 VECTOR parameter rows: per chunk / divisor: bias, mult, shift."""
    r = cfg.cols
    if plan.kind == "avgpool":
        x = graph.tensors[node.inputs[0]]
        y = graph.tensors[node.outputs[0]]
        divs = np.unique(avg_divisors(plan, node.attrs.get("count_include_pad", 0)))
        out = np.zeros((len(divs), 3, r), dtype=np.int64)
        ys = node.attrs.get("out_scale", y.quant.scale)   # the pool's own, before any fusion
        for i, d in enumerate(divs):   # VECTOR fp32 mode, as onnxruntime requantizes
            mult, shift = requant_params(np.array([pool_scale(x.quant.scale, ys, d)]),
                                         node.name)
            out[i, 0] = -plan.kh * plan.kw * x.quant.zero_point
            out[i, 1] = mult[0]
            out[i, 2] = shift[0]
        return out.reshape(-1, r).astype(np.int32)
    cout = plan.cout
    rows = np.zeros((plan.coc, 3, r), dtype=np.int64)
    for name, k in (("bias", 0), ("mult", 1), ("shift", 2)):
        v = np.zeros(plan.coc * r, dtype=np.int64)
        v[:cout] = node.attrs[name]
        rows[:, k, :] = v.reshape(plan.coc, r)
    return rows.reshape(-1, r).astype(np.int32)


def node_constants(node: Node, graph: Graph, cfg: NPUConfig) -> dict[str, bytes]:
    """The DRAM constants a node's program part reads, by key."""
    plan = node.plan
    if isinstance(plan, AggPlan):
        r, c = cfg.rows, cfg.cols
        a = node.attrs
        tiles = plan.tiles if plan.tiles is not None and len(plan.tiles) else \
            np.zeros((1, r, r), np.int8)
        npad = -(-plan.n // r) * r
        start = np.zeros((plan.fbs, npad, c), np.int64)      # ACC start C[i, f], per chunk
        cols = np.zeros(plan.fbs * c, np.int64)
        cols[:plan.f] = a["acc_cols"]
        start[:, :plan.n, :] = np.asarray(a["acc_rows"], np.int64).reshape(1, -1, 1)
        start += cols.reshape(plan.fbs, 1, c)
        par = np.zeros((3, c), np.int64)   # VECTOR rows: bias 0, multiplier, shift (uniform)
        par[1] = np.asarray(a["mult"]).reshape(-1)[0]
        par[2] = np.asarray(a["shift"]).reshape(-1)[0]
        return {"w": tiles.astype(np.int8).tobytes(),
                "c0": np.ascontiguousarray(start, dtype="<i4").tobytes(),
                "par": par.astype("<i4").tobytes()}
    if isinstance(plan, ConvPlan):
        tiles = plan.tiles if plan.tiles is not None and len(plan.tiles) else \
            np.zeros((1, cfg.rows, cfg.cols), np.int8)
        out = {"w": tiles.astype(np.int8).tobytes(),
               "par": _conv_params(node, plan, graph, cfg).astype("<i4").tobytes()}
        rb = node.attrs.get("row_bias")
        if rb is not None:   # per output pixel, every lane (families: constant-left Gemm)
            rows = np.broadcast_to(np.asarray(rb, np.int64).reshape(-1, 1),
                                   (plan.oh * plan.ow, cfg.cols))
            out["rb"] = np.ascontiguousarray(rows, dtype="<i4").tobytes()
        return out
    if isinstance(plan, GatherPlan):
        out = {}
        table = graph.tensors[node.inputs[0]]
        if table.is_const:
            out["table"] = np.ascontiguousarray(table.data, dtype=np.int8).tobytes()
        idx = graph.tensors[node.inputs[1]]
        if idx.is_const:
            ids = np.asarray(idx.data).reshape(-1).astype(np.int64)
            rows = table.shape[0]
            ids = np.where(ids < 0, ids + rows, ids)
            if ids.size and (ids.min() < 0 or ids.max() >= rows):
                raise CompileError("Gather index out of range", node.name, node.onnx_op)
            out["idx"] = ids.astype("<i4").tobytes()
        return out
    return {}


# --------------------------------------------------------------------------------------------
# Addressing helpers
# --------------------------------------------------------------------------------------------

class _View:
    """DRAM addressing of an NPU tensor: pixel (b, y, x) + channel byte offset. ``split``
    overrides the tensor's own row/channel split (a generic concat's copy)."""

    def __init__(self, t: Tensor, split: int | None = None) -> None:
        if t.place is None:
            raise CompileError(f"internal: tensor {t.name!r} has no DRAM placement")
        self.t = t
        self.p: Placement = t.place
        if split is not None:
            if t.view_of is not None or any(self.p.pad):
                raise CompileError(f"internal: {t.name!r} re-split but not contiguous")
            t = dataclasses.replace(t, split=split)
        self.n, self.h, self.w, self.c = geometry(t)
        self.px = self.c if split is not None else self.p.pixel_stride
        self.row = self.p.row_stride(self.w)
        self.img = self.p.image_stride(self.h, self.w)

    def addr(self, b: int, y: int, x: int, ch: int = 0) -> int:
        return self.p.addr + b * self.img + y * self.row + x * self.px + ch


def _load_block(s: Stream, v: _View, cfg: NPUConfig, b: int, iy0: int, ix0: int, br: int,
                bc: int, chunks: list[int], dst: int, fill: int,
                only: list[int] | None = None, fills: bool = True) -> None:
    """Input rows [iy0, iy0+br) x cols [ix0, ix0+bc) of chunks into SPAD [chunk][row][col],
    positions outside the tensor filled with ``fill``. ``only`` restricts the chunk loads to
    these positions in ``chunks``; ``fills=False`` skips the padding fills."""
    r = cfg.rows
    cs = br * bc
    nch = len(chunks)
    r0, r1 = max(0, -iy0), min(br, v.h - iy0)
    c0, c1 = max(0, -ix0), min(bc, v.w - ix0)
    if r1 <= r0 or c1 <= c0:
        if fills:
            _fill(s, dst, cs, nch, cs, fill)
        return
    for jj, j in enumerate(chunks):
        if only is not None and jj not in only:
            continue
        s.load(dram_addr=v.addr(b, iy0 + r0, ix0 + c0, j * r), n_outer=r1 - r0,
               dram_stride_outer=v.row, n_inner=c1 - c0, dram_stride_inner=v.px,
               row_bytes=min(r, v.c - j * r), dst=dst + jj * cs + r0 * bc + c0,
               dst_stride_outer=bc)
    if not fills:
        return
    if r0 > 0:
        _fill(s, dst, r0 * bc, nch, cs, fill)
    if r1 < br:
        _fill(s, dst + r1 * bc, (br - r1) * bc, nch, cs, fill)
    for lo, hi in ((0, c0), (c1, bc)):
        if hi <= lo:
            continue
        if r0 == 0 and r1 == br:
            _fill(s, dst + lo, hi - lo, nch * br, bc, fill)
        else:
            for jj in range(nch):
                _fill(s, dst + jj * cs + r0 * bc + lo, hi - lo, r1 - r0, bc, fill)


def _fill(s: Stream, dst: int, n_inner: int, n_outer: int, stride: int, value: int) -> None:
    if n_inner < 1 or n_outer < 1:
        return
    while n_inner > 65535:  # a contiguous run longer than a field holds (never in practice)
        s.load(dst=dst, n_inner=65535, row_bytes=s.cfg.cols, fill=1, fill_value=value)
        dst += 65535
        n_inner -= 65535
    s.load(dst=dst, n_inner=n_inner, n_outer=n_outer, dst_stride_outer=stride if n_outer > 1
           else 0, row_bytes=s.cfg.cols, fill=1, fill_value=value)


def _eltwise(s: Stream, step: Any, a: int, b: int, dst: int, n: int) -> None:
    """One epilogue step over ``n`` contiguous rows (split to the 12-bit count fields)."""
    done = 0
    while done < n:
        k = min(_ELT_MAX_N, n - done)
        s.eltwise(func=int(EltFunc.ADD), a_addr=a + done, b_addr=b + done, dst=dst + done,
                  n_inner=k, a_zero=step.a_zero, b_zero=step.b_zero, a_mult=step.a_mult,
                  b_mult=step.b_mult, shift=step.shift, zero_point=step.zero_point,
                  clamp_min=step.clamp_min, clamp_max=step.clamp_max)
        done += k


def _store_tile(s: Stream, v: _View, cfg: NPUConfig, src: int, b: int, oy0: int, th: int,
                ox0: int, tw: int, m: int) -> None:
    r = cfg.cols
    s.store(src=src, n_inner=tw, n_outer=th, src_stride_outer=tw if th > 1 else 0,
            row_bytes=min(r, v.c - m * r), dram_addr=v.addr(b, oy0, ox0, m * r),
            dram_stride_inner=v.px, dram_stride_outer=v.row if th > 1 else 0)


def _load_tile(s: Stream, v: _View, cfg: NPUConfig, dst: int, b: int, oy0: int, th: int,
               ox0: int, tw: int, m: int) -> None:
    r = cfg.rows
    s.load(dram_addr=v.addr(b, oy0, ox0, m * r), n_inner=tw, dram_stride_inner=v.px,
           n_outer=th, dram_stride_outer=v.row if th > 1 else 0, row_bytes=min(r, v.c - m * r),
           dst=dst, dst_stride_outer=tw if th > 1 else 0)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class _Layer:
    """One node's work items; each method emits one part of item ``i`` into the stream."""

    n_items = 0
    macs = 0

    def ldw(self, i: int) -> None: ...
    def lda(self, i: int) -> None: ...
    def ex(self, i: int) -> None: ...
    def vx(self, i: int) -> None: ...
    def st(self, i: int) -> None: ...


class _ConvLayer(_Layer):
    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: ConvPlan = node.plan
        plan = self.plan
        self.macs = plan.macs
        buf: Buffers = node.attrs["buffers"]
        self.spad, self.acc = buf.spad, buf.acc
        consts = node.attrs["consts"]
        self.w_dram = consts["w"][0]
        self.par_dram = consts["par"][0]
        self.par_rows = len(consts["par"][1]) // (4 * cfg.cols)
        self.rb_dram = consts["rb"][0] if "rb" in consts else None
        self.x = _View(graph.tensors[node.inputs[0]])
        # Split-K (see mlp): K chunk j of the block reads input part (view, j - first chunk).
        self.x_parts: list[tuple[_View, int]] = [(self.x, 0)]
        if "k_parts" in node.attrs:
            if plan.mode != "rows":
                raise CompileError("internal: split-K matmul not in rows mode", node.name,
                                   node.onnx_op)
            self.x_parts, j0 = [], 0
            for t in node.inputs:
                v = _View(graph.tensors[t])
                self.x_parts.append((v, j0))
                j0 += -(-v.c // cfg.rows)
        self.y = _View(graph.tensors[node.outputs[0]])
        self.zx = graph.tensors[node.inputs[0]].quant.zero_point
        self.steps = node.attrs.get("epilogue", [])
        self.ops = [_View(graph.tensors[st.other]) for st in self.steps if st.other is not None]
        self.zp = node.attrs["zero_point"] if plan.kind != "avgpool" else \
            node.attrs.get("zero_point", graph.tensors[node.outputs[0]].quant.zero_point)
        self.clamp = node.attrs.get("clamp", (-128, 127))
        self.fp32 = int(node.attrs.get("fp32", 0))    # VECTOR fp32 mode (see qmath)
        # Fused siblings (see mlp): output chunk m belongs to one output tensor, requantized
        # (zero point, clamp, steps) and stored as that tensor's chunk m - first chunk.
        self.out_of: list[tuple[_View, int, int, tuple[int, int], list[Any]]] = []
        if "out_parts" in node.attrs:
            for o, part in zip(node.outputs, node.attrs["out_parts"]):
                if part["offset"] % cfg.cols:
                    raise CompileError("internal: fused output not on a chunk boundary",
                                       node.name, node.onnx_op)
                m0 = part["offset"] // cfg.cols
                for _ in range(-(-part["channels"] // cfg.cols)):
                    self.out_of.append((_View(graph.tensors[o]), m0, part["zero_point"],
                                        tuple(part["clamp"]), part["epilogue"]))
        if plan.kind == "avgpool":
            divs = avg_divisors(plan, node.attrs.get("count_include_pad", 0))
            uniq = np.unique(divs)
            self.div_index = np.searchsorted(uniq, divs)
        tiles = plan.spatial_tiles()
        self.items: list[dict[str, Any]] = []
        blk_key, blk_loads, sm_count = None, 0, -1
        for si, tile in enumerate(tiles):
            for m in range(plan.coc):
                groups = [kg for kg in range(plan.kgroups) if (m, kg) in plan.seq]
                sm_count += 1
                for gi, kg in enumerate(groups):
                    key = (si, kg)
                    load_block = key != blk_key
                    if load_block:
                        blk_key = key
                        blk_loads += 1
                    seq = plan.seq[(m, kg)]
                    self.items.append(dict(
                        tile=tile, m=m, kg=kg, seq=seq, first=gi == 0,
                        last=gi == len(groups) - 1, load_block=load_block,
                        blk_slot=(blk_loads - 1) % plan.in_slots, sm=sm_count))
        self.n_items = len(self.items)
        # Streamed weights: the tiles in the order the array consumes them (every spatial tile
        # repeats the layer's tile sequence), in sub-blocks of w_sub through a ring of w_ring.
        self.stream: list[int] = []
        for it in self.items:
            it["q0"] = len(self.stream)
            self.stream.extend(t for _, t in it["seq"] if t >= 0)
        self.n_sub = -(-len(self.stream) // plan.w_sub)
        self.mt = align(plan.oh_t * plan.ow_t, cfg.rows)       # slot stride (aligned)
        self.blk_stride = align(plan.block_rows, cfg.rows)

    # Block geometry of a tile ---------------------------------------------------------------
    def _block(self, tile: tuple[int, ...]) -> tuple[int, int, int, int]:
        p = self.plan
        _, oy0, th, ox0, tw = tile
        if p.mode == "rows":
            return th, tw, oy0 * p.sy, ox0 * p.sx
        br = (th - 1) * p.sy + (p.kh - 1) * p.dy + 1
        if p.mode == "packed":
            return br, tw, oy0 * p.sy - p.pads[0], ox0 * p.sx - p.pads[1]
        bc = (tw - 1) * p.sx + (p.kw - 1) * p.dx + 1
        return br, bc, oy0 * p.sy - p.pads[0], ox0 * p.sx - p.pads[1]

    def _blk_base(self, it: dict[str, Any]) -> int:
        return self.spad["in"][0] + it["blk_slot"] * self.blk_stride

    def _chunks(self, kg: int) -> list[int]:
        g = self.plan.chunks_per_group
        return list(range(kg * g, min(self.plan.cj, (kg + 1) * g)))

    def _acc(self, it: dict[str, Any]) -> int:
        return self.acc["acc"][0] + (it["sm"] % 2) * self.mt

    def _out(self, it: dict[str, Any], base: str = "out") -> int:
        return self.spad[base][0] + (it["sm"] % 2) * self.mt

    def _par(self, it: dict[str, Any]) -> int:
        if self.plan.params_resident or self.plan.kind == "avgpool":
            return self.acc["par"][0] + 3 * (it["m"] if self.plan.kind != "avgpool" else 0)
        return self.acc["par"][0] + 3 * (it["sm"] % 2)

    def _w_addr(self, q: int) -> int:
        """SPAD row of a weight tile: tile ``q`` when resident, else stream position ``q``."""
        r, p = self.cfg.rows, self.plan
        if p.resident:
            return self.spad["w"][0] + q * r
        return self.spad["w"][0] + ((q // p.w_sub) % p.w_ring) * p.w_sub * r + (q % p.w_sub) * r

    def _load_sub(self, b: int) -> None:
        """LOAD stream sub-block ``b`` into its ring slot (if it exists), one LOAD per run of
        consecutive tiles (the sequence restarts at each spatial tile)."""
        if b >= self.n_sub:
            return
        r, p = self.cfg.rows, self.plan
        q0 = b * p.w_sub
        tiles = self.stream[q0:q0 + p.w_sub]
        start = 0
        for k in range(1, len(tiles) + 1):
            if k == len(tiles) or tiles[k] != tiles[k - 1] + 1:
                nt = k - start
                self.s.load(dram_addr=self.w_dram + tiles[start] * r * r, n_inner=r,
                            dram_stride_inner=r, n_outer=nt, dram_stride_outer=r * r,
                            row_bytes=r, dst=self._w_addr(q0 + start),
                            dst_stride_outer=r if nt > 1 else 0)
                start = k

    # Parts ------------------------------------------------------------------------------------
    def ldw(self, i: int) -> None:
        s, r, p = self.s, self.cfg.rows, self.plan
        it = self.items[i]
        acc_row_bytes = 4 * self.cfg.cols
        if i == 0 and p.resident:
            nt = len(p.tiles)
            s.load(dram_addr=self.w_dram, n_inner=r, dram_stride_inner=r, n_outer=nt,
                   dram_stride_outer=r * r, row_bytes=r, dst=self.spad["w"][0],
                   dst_stride_outer=r if nt > 1 else 0)
        if i == 0 and not p.resident:
            for b in range(p.w_ring - 1):     # prefetch: the ring minus the slot in use
                self._load_sub(b)
        if i == 0 and (p.params_resident or p.kind == "avgpool"):
            rows = self.par_rows
            s.load(dram_addr=self.par_dram, n_inner=rows, dram_stride_inner=acc_row_bytes,
                   row_bytes=acc_row_bytes, dst=self.acc["par"][0], mem=1)
        elif not (p.params_resident or p.kind == "avgpool") and it["first"]:
            s.load(dram_addr=self.par_dram + 3 * it["m"] * acc_row_bytes, n_inner=3,
                   dram_stride_inner=acc_row_bytes, row_bytes=acc_row_bytes,
                   dst=self._par(it), mem=1)

    def lda(self, i: int) -> None:
        it = self.items[i]
        if it["load_block"]:
            n = len(self._chunks(it["kg"]))
            if i == 0 and n > _STREAM_AHEAD:
                # The layer's first block waits for the previous layer: load a few chunks
                # now and the rest from inside the matmul loop, in the order they are used,
                # so weights and activations share the DMA in consumption order.
                self._load_input(it, only=list(range(_STREAM_AHEAD)))
                it["stream_from"] = _STREAM_AHEAD
            else:
                self._load_input(it)
        if it["last"]:
            b, oy0, th, ox0, tw = it["tile"]
            for k, v in enumerate(self.ops):
                _load_tile(self.s, v, self.cfg, self._out(it, f"op{k}"), b, oy0, th, ox0, tw,
                           it["m"])

    def _load_input(self, it: dict[str, Any], only: list[int] | None = None,
                    fills: bool = True) -> None:
        """The item's input block; ``only``: just these chunk positions (``fills`` too)."""
        s, p, r, v = self.s, self.plan, self.cfg.rows, self.x
        b = it["tile"][0]
        br, bc, iy0, ix0 = self._block(it["tile"])
        chunks = self._chunks(it["kg"])
        base = self._blk_base(it)
        if p.mode == "std":
            _load_block(s, v, self.cfg, b, iy0, ix0, br, bc, chunks, base, self.zx, only,
                        fills)
        elif p.mode == "rows":
            th, tw = br, bc
            for jj, jk in enumerate(chunks):
                if only is not None and jj not in only:
                    continue
                v, j0 = next(xp for xp in reversed(self.x_parts) if xp[1] <= jk)
                j = jk - j0
                contiguous = p.sx == 1 and p.sy == 1 and tw == v.w and v.row == v.w * v.px
                rb = min(r, v.c - j * r)
                dst = base + jj * th * tw
                if contiguous:
                    s.load(dram_addr=v.addr(b, iy0, ix0, j * r), n_inner=th * tw,
                           dram_stride_inner=v.px, row_bytes=rb, dst=dst)
                else:
                    s.load(dram_addr=v.addr(b, iy0, ix0, j * r), n_inner=tw,
                           dram_stride_inner=p.sx * v.px, n_outer=th,
                           dram_stride_outer=p.sy * v.row if th > 1 else 0, row_bytes=rb,
                           dst=dst, dst_stride_outer=tw if th > 1 else 0)
        else:  # packed: physically padded input, windows of kw*C bytes
            kwc = p.kw * p.c
            for jj, j in enumerate(chunks):
                if only is not None and jj not in only:
                    continue
                s.load(dram_addr=v.addr(b, iy0, ix0, j * r), n_inner=bc,
                       dram_stride_inner=p.sx * v.px, n_outer=br,
                       dram_stride_outer=v.row if br > 1 else 0,
                       row_bytes=min(r, kwc - j * r), dst=base + jj * br * bc,
                       dst_stride_outer=bc if br > 1 else 0)

    def ex(self, i: int) -> None:
        s, p = self.s, self.plan
        it = self.items[i]
        _, oy0, th, ox0, tw = it["tile"]
        br, bc, _, _ = self._block(it["tile"])
        base = self._blk_base(it)
        acc = self._acc(it)
        kg0 = it["kg"] * p.chunks_per_group
        stream = not p.resident
        q = it["q0"]                            # stream position of the next fresh tile
        ahead = it.get("stream_from", 0)        # next chunk of a streamed first block
        n_chunks = len(self._chunks(it["kg"]))
        last_jj = -1
        if self.rb_dram is not None and it["first"]:
            # Per-row bias: the ACC rows start at it and every MATMUL accumulates.
            rb = 4 * self.cfg.cols
            s.load(dram_addr=self.rb_dram + (oy0 * p.ow + ox0) * rb, n_inner=tw,
                   dram_stride_inner=rb, n_outer=th, dram_stride_outer=p.ow * rb if th > 1 else 0,
                   row_bytes=rb, dst=acc, dst_stride_outer=tw if th > 1 else 0, mem=1)
        for n, (k, t) in enumerate(it["seq"]):
            ky, kx, j = p.ktiles[k]
            jj = j - kg0
            if ahead and jj != last_jj:
                last_jj = jj
                while ahead < n_chunks and ahead <= jj + _STREAM_AHEAD:
                    self._load_input(it, only=[ahead], fills=False)
                    ahead += 1
            if t >= 0:
                if stream:
                    if q % p.w_sub == 0:
                        # Refill the slot the previous sub-block just left.
                        self._load_sub(q // p.w_sub + p.w_ring - 1)
                    s.preload(self._w_addr(q))
                    q += 1
                else:
                    s.preload(self._w_addr(t))
            accumulate = 0 if (it["first"] and n == 0 and self.rb_dram is None) else 1
            if p.mode == "rows":
                s.matmul(spad_addr=base + jj * th * tw, acc_addr=acc, n_inner=th * tw,
                         accumulate=accumulate, swap=int(t >= 0))
            elif p.mode == "packed":
                s.matmul(spad_addr=base + jj * br * bc + ky * p.dy * bc, acc_addr=acc,
                         n_inner=tw, n_outer=th, spad_stride_outer=p.sy * bc if th > 1 else 0,
                         accumulate=accumulate, swap=int(t >= 0))
            else:
                s.matmul(spad_addr=base + jj * br * bc + ky * p.dy * bc + kx * p.dx,
                         acc_addr=acc, n_inner=tw, spad_stride_inner=p.sx, n_outer=th,
                         spad_stride_outer=p.sy * bc if th > 1 else 0, accumulate=accumulate,
                         swap=int(t >= 0))
        if ahead:   # chunks this item did not use (later items of the block will)
            while ahead < n_chunks:
                self._load_input(it, only=[ahead], fills=False)
                ahead += 1

    def vx(self, i: int) -> None:
        it = self.items[i]
        if not it["last"]:
            return
        s, p = self.s, self.plan
        _, oy0, th, ox0, tw = it["tile"]
        n = th * tw
        acc, out = self._acc(it), self._out(it)
        lo, hi = self.clamp
        zp, steps = self.zp, self.steps
        if self.out_of:
            _, _, zp, (lo, hi), steps = self.out_of[it["m"]]
        if p.kind == "avgpool":
            idx = self.div_index[oy0:oy0 + th, ox0:ox0 + tw].reshape(-1)
            start = 0
            while start < n:
                end = start
                while end < n and idx[end] == idx[start]:
                    end += 1
                s.vector(acc_addr=acc + start, spad_addr=out + start,
                         param_addr=self.acc["par"][0] + 3 * int(idx[start]), n=end - start,
                         zero_point=self.zp, clamp_min=lo, clamp_max=hi, fp32=1)
                start = end
        else:
            s.vector(acc_addr=acc, spad_addr=out, param_addr=self._par(it), n=n,
                     zero_point=zp, clamp_min=lo, clamp_max=hi, fp32=self.fp32)
        k = 0
        for step in steps:
            b = out
            if step.other is not None:
                b = self._out(it, f"op{k}")
                k += 1
            _eltwise(s, step, out, b, out, n)

    def st(self, i: int) -> None:
        it = self.items[i]
        if not it["last"]:
            return
        b, oy0, th, ox0, tw = it["tile"]
        y, m = self.y, it["m"]
        if self.out_of:
            y, m0 = self.out_of[m][:2]
            m -= m0
        _store_tile(self.s, y, self.cfg, self._out(it), b, oy0, th, ox0, tw, m)


class _AggLayer(_Layer):
    """``Y = A X`` with A constant (:class:`AggPlan`): one item per (output tile, group of
    feature chunks, non-zero k-block); A's blocks of the item are loaded once and stream
    under each chunk's tile of X, PRELOADed as the weights, into that chunk's ACC rows."""

    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: AggPlan = node.plan
        p = self.plan
        self.macs = p.macs
        buf: Buffers = node.attrs["buffers"]
        self.spad, self.acc = buf.spad, buf.acc
        consts = node.attrs["consts"]
        self.w_dram, self.c0_dram, self.par_dram = (consts[k][0] for k in ("w", "c0", "par"))
        self.x = _View(graph.tensors[node.inputs[0]])
        self.y = _View(graph.tensors[node.outputs[0]])
        self.steps = node.attrs.get("epilogue", [])
        self.ops = [_View(graph.tensors[st.other]) for st in self.steps if st.other is not None]
        self.zp = node.attrs["zero_point"]
        self.clamp = node.attrs.get("clamp", (-128, 127))
        self.fp32 = int(node.attrs.get("fp32", 0))
        r = cfg.rows
        self.npad = -(-p.n // r) * r
        kbn = -(-p.k // r)
        self.items: list[dict[str, Any]] = []
        out_no = 0
        for t in range(p.n_tiles):
            i0 = t * p.mt
            for f0 in range(0, p.fbs, p.fg):
                fbs = list(range(f0, min(p.fbs, f0 + p.fg)))
                kbs: list[int | None] = [kb for kb in range(kbn) if (t, kb) in p.runs]
                for j, kb in enumerate(kbs or [None]):
                    first, runs = p.runs[(t, kb)] if kb is not None else (0, [])
                    self.items.append(dict(
                        i0=i0, rows=min(p.mt, p.n - i0), fbs=fbs, kb=kb, tile0=first,
                        runs=runs, first=j == 0, last=j == max(0, len(kbs) - 1), out=out_no))
                out_no += 1
        self.n_items = len(self.items)
        seen: set[tuple[int, int | None]] = set()
        for it in self.items:     # resident X: each chunk group's k-block loaded once
            key = (it["fbs"][0], it["kb"])
            it["load_x"] = not p.x_resident or key not in seen
            seen.add(key)
        self.kpad = -(-p.k // r) * r

    def _acc(self, it: dict[str, Any], jf: int) -> int:
        p = self.plan
        return self.acc["acc"][0] + ((it["out"] % 2) * p.fg + jf) * p.mt

    def _out(self, it: dict[str, Any], jf: int, base: str = "out") -> int:
        p = self.plan
        return self.spad[base][0] + ((it["out"] % 2) * p.fg + jf) * p.mt

    def _w(self, i: int, jf: int) -> int:
        it, r = self.items[i], self.cfg.rows
        if self.plan.x_resident:
            return self.spad["w"][0] + jf * self.kpad + it["kb"] * r
        return self.spad["w"][0] + ((i % AGG_SLOTS) * self.plan.fg + jf) * r

    def _a(self, i: int) -> int:
        return self.spad["a"][0] + (i % AGG_SLOTS) * self.plan.mt

    def ldw(self, i: int) -> None:
        s, r = self.s, self.cfg.rows
        it = self.items[i]
        if i == 0:
            s.load(dram_addr=self.par_dram, n_inner=3, dram_stride_inner=4 * self.cfg.cols,
                   row_bytes=4 * self.cfg.cols, dst=self.acc["par"][0], mem=1)
        nblk = sum(nb for _, nb, _ in it["runs"])
        if nblk:   # the item's non-zero blocks of A, stored consecutively
            s.load(dram_addr=self.w_dram + it["tile0"] * r * r, n_inner=nblk * r,
                   dram_stride_inner=r, row_bytes=r, dst=self._a(i))

    def lda(self, i: int) -> None:
        s, r, c, p = self.s, self.cfg.rows, self.cfg.cols, self.plan
        it = self.items[i]
        if it["first"]:
            # C[i, f] = -zx * sum_k A[i, k] (+ a Gemm bias): the per-node zero-point term
            # VECTOR's per-lane bias cannot add; every MATMUL accumulates onto it.
            nf = len(it["fbs"])
            s.load(dram_addr=self.c0_dram + (it["fbs"][0] * self.npad + it["i0"]) * 4 * c,
                   n_inner=min(p.mt, self.npad - it["i0"]), dram_stride_inner=4 * c,
                   n_outer=nf, dram_stride_outer=self.npad * 4 * c if nf > 1 else 0,
                   row_bytes=4 * c, dst=self._acc(it, 0),
                   dst_stride_outer=p.mt if nf > 1 else 0, mem=1)
        if it["kb"] is not None and it["load_x"]:
            # X[kb rows, chunk] as is: row k = the weights of input lane k. Rows past K
            # stay stale: they meet A's zero-padded columns.
            k0 = it["kb"] * r
            for jf, fb in enumerate(it["fbs"]):
                s.load(dram_addr=self.x.addr(0, 0, k0, fb * c), n_inner=min(r, p.k - k0),
                       dram_stride_inner=self.x.px, row_bytes=min(c, p.f - fb * c),
                       dst=self._w(i, jf))
        if it["last"]:
            for k, v in enumerate(self.ops):
                for jf, fb in enumerate(it["fbs"]):
                    _load_tile(s, v, self.cfg, self._out(it, jf, f"op{k}"), 0, 0, 1,
                               it["i0"], it["rows"], fb)

    def ex(self, i: int) -> None:
        s, r = self.s, self.cfg.rows
        it = self.items[i]
        nf = len(it["fbs"])
        if it["kb"] is None:
            return
        a0 = self._a(i)
        for jf in range(nf):
            s.preload(self._w(i, jf))
            acc = self._acc(it, jf)
            for j, (ib, nb, off) in enumerate(it["runs"]):
                s.matmul(spad_addr=a0 + off * r, acc_addr=acc + ib * r, n_inner=nb * r,
                         accumulate=1, swap=int(j == 0))

    def vx(self, i: int) -> None:
        it = self.items[i]
        if not it["last"]:
            return
        lo, hi = self.clamp
        for jf in range(len(it["fbs"])):
            out = self._out(it, jf)
            self.s.vector(acc_addr=self._acc(it, jf), spad_addr=out,
                          param_addr=self.acc["par"][0], n=it["rows"], zero_point=self.zp,
                          clamp_min=lo, clamp_max=hi, fp32=self.fp32)
            k = 0
            for step in self.steps:
                b = out
                if step.other is not None:
                    b = self._out(it, jf, f"op{k}")
                    k += 1
                _eltwise(self.s, step, out, b, out, it["rows"])

    def st(self, i: int) -> None:
        it = self.items[i]
        if it["last"]:
            for jf, fb in enumerate(it["fbs"]):
                _store_tile(self.s, self.y, self.cfg, self._out(it, jf), 0, 0, 1, it["i0"],
                            it["rows"], fb)


class _MaxPoolLayer(_Layer):
    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: PoolPlan = node.plan
        buf: Buffers = node.attrs["buffers"]
        self.spad = buf.spad
        self.x = _View(graph.tensors[node.inputs[0]])
        self.y = _View(graph.tensors[node.outputs[0]])
        self.steps = node.attrs.get("epilogue", [])
        self.ops = [_View(graph.tensors[st.other]) for st in self.steps if st.other is not None]
        self.items = [(t, j) for t in self.plan.spatial_tiles() for j in range(self.plan.cj)]
        self.n_items = len(self.items)
        self.in_stride = align(self.plan.br * self.plan.bc, cfg.rows)
        self.mt = align(self.plan.oh_t * self.plan.ow_t, cfg.rows)

    def _geom(self, i: int) -> tuple[int, int, int, int]:
        p = self.plan
        _, oy0, th, ox0, tw = self.items[i][0]
        br = (th - 1) * p.sy + (p.kh - 1) * p.dy + 1
        bc = (tw - 1) * p.sx + (p.kw - 1) * p.dx + 1
        return br, bc, oy0 * p.sy - p.pads[0], ox0 * p.sx - p.pads[1]

    def _slot(self, name: str, i: int, size: int) -> int:
        return self.spad[name][0] + (i % 2) * size

    def lda(self, i: int) -> None:
        (b, oy0, th, ox0, tw), j = self.items[i]
        br, bc, iy0, ix0 = self._geom(i)
        _load_block(self.s, self.x, self.cfg, b, iy0, ix0, br, bc, [j],
                    self._slot("in", i, self.in_stride), INT8_MIN)
        for k, v in enumerate(self.ops):
            _load_tile(self.s, v, self.cfg, self._slot(f"op{k}", i, self.mt), b, oy0,
                       th, ox0, tw, j)

    def vx(self, i: int) -> None:
        s, p = self.s, self.plan
        (_, _, th, _, tw), _ = self.items[i]
        br, bc, _, _ = self._geom(i)
        blk = self._slot("in", i, self.in_stride)
        out = self._slot("out", i, self.mt)
        offs = [ky * p.dy * bc + kx * p.dx for ky in range(p.kh) for kx in range(p.kw)]
        so = p.sy * bc if th > 1 else 0
        first_b = offs[1] if len(offs) > 1 else offs[0]
        s.eltwise(func=int(EltFunc.MAX), a_addr=blk + offs[0], b_addr=blk + first_b, dst=out,
                  n_inner=tw, n_outer=th, a_stride_inner=p.sx, a_stride_outer=so,
                  b_stride_inner=p.sx, b_stride_outer=so)
        for off in offs[2:]:
            s.eltwise(func=int(EltFunc.MAX), a_addr=out, b_addr=blk + off, dst=out, n_inner=tw,
                      n_outer=th, a_stride_inner=1, a_stride_outer=tw if th > 1 else 0,
                      b_stride_inner=p.sx, b_stride_outer=so)
        k = 0
        for step in self.steps:
            b = out
            if step.other is not None:
                b = self._slot(f"op{k}", i, self.mt)
                k += 1
            _eltwise(s, step, out, b, out, th * tw)

    def st(self, i: int) -> None:
        (b, oy0, th, ox0, tw), j = self.items[i]
        _store_tile(self.s, self.y, self.cfg, self._slot("out", i, self.mt), b, oy0,
                    th, ox0, tw, j)


class _EltLayer(_Layer):
    """add / clamp / copy: load operand tiles, run the steps, store."""

    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: EltPlan = node.plan
        self.spad = node.attrs["buffers"].spad
        self.a = _View(graph.tensors[node.inputs[0]], node.attrs.get("in_split"))
        self.y = _View(graph.tensors[node.outputs[0]])
        self.steps = node.attrs.get("epilogue", [])
        self.ops = [_View(graph.tensors[st.other]) for st in self.steps if st.other is not None]
        self.items = [(t, j) for t in self.plan.spatial_tiles() for j in range(self.plan.cj)]
        self.n_items = len(self.items)
        self.mt = align(self.plan.oh_t * self.plan.ow_t, cfg.rows)
        # An identity copy needs no vector work: store straight from the loaded tile.
        self.passthrough = not self.steps

    def _slot(self, name: str, i: int) -> int:
        return self.spad[name][0] + (i % 2) * self.mt

    def _op_slot(self, k: int, i: int) -> int:
        name = "b" if (self.node.op == "add" and k == 0) else \
            f"op{k - (self.node.op == 'add')}"
        return self._slot(name, i)

    def lda(self, i: int) -> None:
        (b, oy0, th, ox0, tw), j = self.items[i]
        _load_tile(self.s, self.a, self.cfg, self._slot("a", i), b, oy0, th, ox0, tw, j)
        for k, v in enumerate(self.ops):
            _load_tile(self.s, v, self.cfg, self._op_slot(k, i), b, oy0, th, ox0, tw, j)

    def vx(self, i: int) -> None:
        if self.passthrough:
            return
        (_, _, th, _, tw), _ = self.items[i]
        n = th * tw
        src, out = self._slot("a", i), self._slot("out", i)
        k = 0
        for step in self.steps:
            b = src
            if step.other is not None:
                b = self._op_slot(k, i)
                k += 1
            _eltwise(self.s, step, src, b, out, n)
            src = out

    def st(self, i: int) -> None:
        (b, oy0, th, ox0, tw), j = self.items[i]
        src = self._slot("a", i) if self.passthrough else self._slot("out", i)
        _store_tile(self.s, self.y, self.cfg, src, b, oy0, th, ox0, tw, j)


class _GatherLayer(_Layer):
    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: GatherPlan = node.plan
        self.spad = node.attrs["buffers"].spad
        consts = node.attrs["consts"]
        table = graph.tensors[node.inputs[0]]
        idx = graph.tensors[node.inputs[1]]
        self.table_addr = consts["table"][0] if "table" in consts else table.place.addr
        self.table_bytes = int(np.prod(table.shape))
        self.width = geometry(table)[3]
        self.idx_addr = consts["idx"][0] if "idx" in consts else idx.place.addr
        self.y = _View(graph.tensors[node.outputs[0]])
        p = self.plan
        self.items = [(i0, min(p.block, p.rows - i0), j) for i0 in range(0, p.rows, p.block)
                      for j in range(p.cj)]
        self.n_items = len(self.items)

    def lda(self, i: int) -> None:
        i0, nb, j = self.items[i]
        r, p = self.cfg.rows, self.plan
        self.s.gather(dram_addr=self.table_addr + j * r, index_addr=self.idx_addr + 4 * i0,
                      row_stride=p.width, n=nb,
                      dst=self.spad["g"][0] + (i % 2) * align(p.block, r),
                      row_bytes=min(r, p.width - j * r), table_bytes=self.table_bytes)

    def st(self, i: int) -> None:
        i0, nb, j = self.items[i]
        r, p = self.cfg.rows, self.plan
        self.s.store(src=self.spad["g"][0] + (i % 2) * align(p.block, r), n_inner=nb,
                     row_bytes=min(r, p.width - j * r), dram_addr=self.y.addr(0, 0, i0, j * r),
                     dram_stride_inner=self.y.px)


class _ReorderLayer(_Layer):
    """NHWC <-> row-major: each SPAD row carries one byte (LOAD/STORE with row_bytes 1)."""

    def __init__(self, node: Node, graph: Graph, cfg: NPUConfig, s: Stream) -> None:
        self.node, self.cfg, self.s = node, cfg, s
        self.plan: ReorderPlan = node.plan
        self.spad = node.attrs["buffers"].spad
        p = self.plan
        cl, rows = (node.inputs[0], node.outputs[0]) if p.to_rows else \
            (node.outputs[0], node.inputs[0])
        self.cl = _View(graph.tensors[cl])
        self.rows_addr = graph.tensors[rows].place.addr
        self.items = p.items()
        self.n_items = len(self.items)
        self.slot = align(p.cb * p.pixels, cfg.rows)

    def _rows(self, b: int, y: int, x0: int, c0: int) -> int:
        p = self.plan
        return self.rows_addr + ((b * p.c + c0) * p.h + y) * p.w + x0

    def lda(self, i: int) -> None:
        b, y, x0, xw, c0, cb = self.items[i]
        p, v = self.plan, self.cl
        dst = self.spad["r"][0] + (i % 2) * self.slot
        if p.to_rows:
            self.s.load(dram_addr=v.addr(b, y, x0, c0), n_inner=xw, dram_stride_inner=v.px,
                        n_outer=cb, dram_stride_outer=1 if cb > 1 else 0, row_bytes=1,
                        dst=dst, dst_stride_outer=xw if cb > 1 else 0)
        else:
            self.s.load(dram_addr=self._rows(b, y, x0, c0), n_inner=xw, dram_stride_inner=1,
                        n_outer=cb, dram_stride_outer=p.h * p.w if cb > 1 else 0, row_bytes=1,
                        dst=dst, dst_stride_outer=xw if cb > 1 else 0)

    def st(self, i: int) -> None:
        b, y, x0, xw, c0, cb = self.items[i]
        p, v = self.plan, self.cl
        src = self.spad["r"][0] + (i % 2) * self.slot
        if p.to_rows:
            self.s.store(src=src, n_inner=xw, n_outer=cb, src_stride_outer=xw if cb > 1
                         else 0, row_bytes=1, dram_addr=self._rows(b, y, x0, c0),
                         dram_stride_inner=1, dram_stride_outer=p.h * p.w if cb > 1 else 0)
        else:
            self.s.store(src=src, n_inner=xw, n_outer=cb, src_stride_outer=xw if cb > 1
                         else 0, row_bytes=1, dram_addr=v.addr(b, y, x0, c0),
                         dram_stride_inner=v.px, dram_stride_outer=1 if cb > 1 else 0)


_LAYERS: dict[str, Callable[..., _Layer]] = {
    "conv": _ConvLayer, "avgpool": _ConvLayer, "maxpool": _MaxPoolLayer, "add": _EltLayer,
    "clamp": _EltLayer, "copy": _EltLayer, "gather": _GatherLayer, "reorder": _ReorderLayer,
}


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------

def _binding(t: Tensor) -> Binding:
    n, h, w, c = geometry(t)
    p = t.place
    pad = p.pad if p is not None else (0, 0, 0, 0)
    if t.layout == "NHWC" or any(pad):
        shape: tuple[int, ...] = (n, h + pad[0] + pad[2], w + pad[1] + pad[3], c)
        layout = "NHWC" if t.layout == "NHWC" else "rows"
    else:
        shape = tuple(t.shape) if t.shape else (1,)
        layout = t.layout or "rows"
    addr = p.addr - (pad[0] * p.row_stride(w) + pad[1] * p.pixel_stride) if p else 0
    q = t.quant
    dtype = "int32" if t.dtype in ("int64", "int32") else "int8"
    return Binding(t.name, addr, shape, dtype, layout, q.scale if q else 1.0,
                   q.zero_point if q else 0)


def _disjoint(nxt: Node, cur: Node) -> bool:
    """True when ``nxt``'s weight/parameter buffers overlap none of ``cur``'s buffers."""
    a, b = nxt.attrs.get("buffers"), cur.attrs.get("buffers")
    if a is None or b is None:
        return True
    for mine, theirs in ((a.spad, b.spad), (a.acc, b.acc)):
        for key in ("w", "par"):
            if key not in mine:
                continue
            lo, n = mine[key]
            for lo2, n2 in theirs.values():
                if lo < lo2 + n2 and lo2 < lo + n:
                    return False
    return True


def _rows_done(conv: _ConvLayer) -> list[tuple[int, int]]:
    """After each item of a conv layer: (image, output rows fully stored, all channels)."""
    p = conv.plan
    cols = -(-p.ow // p.ow_t)
    out, band_done, done = [], 0, (0, 0)
    for it in conv.items:
        b, oy0, th, ox0, tw = it["tile"]
        if it["last"] and it["m"] == p.coc - 1:
            band_done += 1
            if band_done == cols:
                band_done = 0
                done = (b, oy0 + th)
        out.append(done)
    return out


def _overlap_pools(graph: Graph, layers: list[tuple[Node, _Layer]]
                   ) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Items of a MaxPool right after the conv writing its input, each attached to the conv
    item after which its input rows are in DRAM: the vector unit pools while the array keeps
    computing (program order stays the semantics: each pooled tile is loaded after the stores
    it reads). Applies when the two layers' on-chip buffers are disjoint."""
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k in range(len(layers) - 1):
        (a_node, a), (b_node, b) = layers[k], layers[k + 1]
        if not (isinstance(a, _ConvLayer) and isinstance(b, _MaxPoolLayer)):
            continue
        x = graph.tensors[b_node.inputs[0]]
        y = graph.tensors[a_node.outputs[0]]
        base_x = x.name
        base_y = y.view_of[0] if y.view_of is not None else y.name
        if base_x != base_y or not _all_disjoint(a_node, b_node):
            continue
        done = _rows_done(a)
        p = b.plan
        # Spread the pool's items evenly over the conv's (each ride comes after the stores it
        # reads): a burst of vector work would fill the VX queue and stall the dispatcher.
        per = -(-b.n_items // max(1, a.n_items))
        load = [0] * len(done)
        prev = 0
        for j, ((bi, oy0, th, _, _), _) in enumerate(b.items):
            need = min(p.h, (oy0 + th - 1) * p.sy - p.pads[0] + (p.kh - 1) * p.dy + 1)
            at = next((i for i, (img, rows) in enumerate(done)
                       if img > bi or (img == bi and rows >= need)), len(done) - 1)
            at = max(at, prev)
            while at < len(done) - 1 and load[at] >= per:
                at += 1
            load[at] += 1
            prev = at
            out.setdefault((k, at), []).append((k + 1, j))
    return out


def _riders(layers: list[tuple[Node, _Layer]]) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Items of an eltwise node with ``attrs['ride_with']`` (a split-K rescale placed before
    a matmul, see :mod:`npu.compiler.passes.mlp`), spread evenly over that matmul's items.
    The matmul neither reads the rescale's output nor writes its input (allocate keeps the
    input alive through it), so issuing the rescale later in program order keeps the
    semantics; it applies when the two nodes' on-chip buffers are disjoint."""
    index = {node.name: k for k, (node, _) in enumerate(layers)}
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for k, (node, layer) in enumerate(layers):
        c = index.get(node.attrs.get("ride_with", ""), -1)
        if c <= k or not isinstance(layer, _EltLayer) or \
                not isinstance(layers[c][1], _ConvLayer) or \
                not _all_disjoint(node, layers[c][0]) or \
                set(node.outputs) & set(layers[c][0].inputs):
            continue
        host = layers[c][1]
        for j in range(layer.n_items):
            at = min(host.n_items - 1, j * host.n_items // layer.n_items)
            out.setdefault((c, at), []).append((k, j))
    return out


def _all_disjoint(a: Node, b: Node) -> bool:
    ba, bb = a.attrs.get("buffers"), b.attrs.get("buffers")
    if ba is None or bb is None:
        return False
    for mine, theirs in ((ba.spad, bb.spad), (ba.acc, bb.acc)):
        for lo, n in mine.values():
            for lo2, n2 in theirs.values():
                if lo < lo2 + n2 and lo2 < lo + n:
                    return False
    return True


def emit_segment(graph: Graph, seg: Segment, cfg: NPUConfig, progress: Any = None) -> Program:
    """Build the program of one segment."""
    dram_bytes = int(seg.stats["dram_bytes"])
    for t, place in seg.stats.get("places", {}).items():
        graph.tensors[t].place = place      # this segment's placements (see allocate)
    s = Stream(cfg, dram_bytes, int(seg.stats.get("const_end", 0)))
    layers: list[tuple[Node, _Layer]] = []
    for name in seg.nodes:
        node = graph.node(name)
        maker = _AggLayer if isinstance(node.plan, AggPlan) else _LAYERS.get(node.op)
        if maker is None:
            continue  # concat / reshape: nothing to run (views and aliases)
        layer = maker(node, graph, cfg, s)
        if layer.n_items:
            layers.append((node, layer))
    attached = _overlap_pools(graph, layers)
    for key, lst in _riders(layers).items():
        attached.setdefault(key, []).extend(lst)
    hidden = {it for lst in attached.values() for it in lst}
    items = [(li, i) for li, (_, layer) in enumerate(layers) for i in range(layer.n_items)
             if (li, i) not in hidden]
    if items:
        li0, i0 = items[0]
        node0, l0 = layers[li0]
        s.region(node0.name)
        l0.ldw(i0)
        l0.lda(i0)
    for k, (li, i) in enumerate(items):
        node, layer = layers[li]
        nxt = items[k + 1] if k + 1 < len(items) else None
        # The next layer's weights are prefetched before this layer's last item unless they
        # land in buffers this layer still uses (program order is the semantics).
        riders = attached.get((li, i), [])
        early = nxt is not None and (nxt[0] == li or all(
            _disjoint(layers[nxt[0]][0], n) for n in
            [node] + [layers[lj][0] for lj, _ in riders]))
        if early:
            layers[nxt[0]][1].ldw(nxt[1])
            if nxt[0] == li:
                layers[nxt[0]][1].lda(nxt[1])
        layer.ex(i)
        layer.vx(i)
        layer.st(i)
        for lj, j in riders:   # items of a pooling layer whose input rows are now stored
            rider = layers[lj][1]
            rider.lda(j)
            rider.vx(j)
            rider.st(j)
        if nxt is not None and nxt[0] != li:
            s.region(layers[nxt[0]][0].name)
            if not early:
                layers[nxt[0]][1].ldw(nxt[1])
            layers[nxt[0]][1].lda(nxt[1])
        if progress is not None and i == layer.n_items - 1:
            progress.update(1)
    s.halt()
    stats = s.assign_tokens()
    words = s.encode()
    segments = [DramSegment(key, addr, data) for key, (addr, data) in
                seg.stats["consts"].items() if data]
    inputs = [_binding(graph.tensors[t]) for t in seg.inputs]
    outputs = [_binding(graph.tensors[t]) for t in seg.outputs]
    layers_meta = [{"name": node.name, "op": node.op, "onnx": node.onnx_op,
                    "macs": int(layer.macs)} for node, layer in layers]
    meta = {"name": f"{graph.name}/segment{seg.index}", "segment": seg.index,
            "layers": layers_meta, "tokens": stats, "instructions": s.engine_counts()}
    seg.stats.update(instructions=len(s), waits=stats["waits"])
    return Program(cfg, words, dram_bytes, segments, inputs, outputs, list(s.regions), meta)


def emit(graph: Graph, config: NPUConfig, progress: Any = None) -> Graph:
    """Build every segment's program (``Segment.program``)."""
    for seg in graph.segments:
        seg.program = emit_segment(graph, seg, config, progress)
    return graph
