"""Tile: choose, for every NPU node, how its work is cut into tiles that fit SPAD and ACC.

The unit of work is an *item*: one output tile (a rectangle of output pixels of one image) times
one chunk of ``cols`` output channels (ACC rows = pixels, lanes = channels), possibly split over
several *K groups* when the input block of all reduction chunks does not fit SPAD (partial sums
then stay in ACC). Every choice is derived from :class:`npu.isa.NPUConfig` and the layer shape:

* the output tile is as large as two ACC slots allow (double buffering: the vector unit drains
  one while the array fills the other), balanced over the output rows;
* a convolution reads a *block* of input rows per K group: ``mode="std"`` loads padded input
  blocks and runs one shifted matmul per kernel offset (strides and dilation through MATMUL's
  2-D strides); ``"rows"`` (1x1, no padding) loads the (sub-sampled) pixels directly; ``"packed"``
  puts kernel-width offsets x channels into the reduction dimension for layers with few input
  channels (a LOAD row reads ``kw*C`` neighbouring NHWC bytes from a physically padded input);
* weights stay resident in SPAD when they fit beside double-buffered blocks, else they stream
  through a small ring of sub-blocks whose loads are interleaved with the matmuls; the cheaper
  of the two by a small cost model of array, DMA and per-item overhead cycles wins;
* all-zero weight tiles (grouped/depthwise convolutions) are skipped, and consecutive identical
  tiles (the identity tiles of average pooling) are preloaded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from npu.compiler.errors import CompileError
from npu.compiler.ir import Graph, Node, geometry
from npu.compiler.passes.mlp import out_parts, split_k_weight
from npu.isa import NPUConfig

__all__ = ["ConvPlan", "AggPlan", "PoolPlan", "EltPlan", "GatherPlan", "ReorderPlan",
           "tile", "conv_tiles",
           "PACKED_MAX_C"]

#: Streamed weights flow through a ring of this many sub-blocks in SPAD: the LOAD of sub-block
#: c + W_RING - 1 is issued just before the matmuls of sub-block c, so weights arrive while the
#: array works, whatever an item's size (see emit).
W_RING = 4
#: Most weight tiles one streaming LOAD moves.
W_SUB_MAX = 64
#: Packing kernel offsets into the reduction is considered for inputs with at most this many
#: channels (e.g. the RGB first layer); it must also need fewer K tiles than the plain form.
PACKED_MAX_C = 8
_ITEM_OVERHEAD = 40   # cycles an item costs beyond its matmuls (pipeline bubbles, sync)
#: Rows per tile of an eltwise node riding along a matmul (about one conv item's rows).
_RIDER_ROWS = 512


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _al(x: int, a: int) -> int:
    """``x`` rounded up to a multiple of ``a`` (buffers are aligned to hazard blocks)."""
    return _cdiv(x, a) * a


def _spatial_tiles(n: int, h: int, w: int, th: int, tw: int
                   ) -> list[tuple[int, int, int, int, int]]:
    """Output tiles ``(image, y0, rows, x0, cols)`` covering n images of h x w in th x tw
    steps, in order (the last tile of a row or column may be smaller)."""
    return [(b, oy, min(th, h - oy), ox, min(tw, w - ox))
            for b in range(n) for oy in range(0, h, th) for ox in range(0, w, tw)]


@dataclass
class ConvPlan:
    """How a ``conv`` or ``avgpool`` node runs (see the module doc)."""

    kind: str                       # "conv" | "dense" | "avgpool"
    mode: str                       # "std" | "rows" | "packed"
    n: int
    h: int
    w: int
    c: int
    oh: int
    ow: int
    cout: int
    kh: int
    kw: int
    sy: int
    sx: int
    dy: int
    dx: int
    pads: tuple[int, int, int, int]
    cj: int                         # reduction chunks per kernel offset (channels or bytes)
    coc: int                        # output channel chunks
    oh_t: int
    ow_t: int
    chunks_per_group: int           # reduction chunks per input block (K group)
    resident: bool                  # all weights in SPAD for the whole layer
    in_slots: int                   # input block buffers (1 or 2)
    br: int                         # block rows
    bc: int                         # block columns (std: padded cols; rows/packed: ow_t)
    # Weight tiles, in emission order per (m, kg): list of (ktile, tile index) pairs, with
    # `tiles[tile index]` an int8 [rows, cols] array (duplicates of the previous one dropped).
    ktiles: list[tuple[int, int, int]] = field(default_factory=list, repr=False)
    seq: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict, repr=False)
    tiles: np.ndarray | None = field(default=None, repr=False)
    params_resident: bool = True
    w_sub: int = 1                  # streamed weights: tiles per LOAD (a ring sub-block)
    w_ring: int = W_RING            # streamed weights: sub-blocks in the SPAD ring
    est_cycles: int = 0
    macs: int = 0

    @property
    def kgroups(self) -> int:
        return _cdiv(self.cj, self.chunks_per_group)

    @property
    def n_spatial(self) -> int:
        return self.n * _cdiv(self.oh, self.oh_t) * _cdiv(self.ow, self.ow_t)

    @property
    def block_rows(self) -> int:
        return self.chunks_per_group * self.br * self.bc

    def spatial_tiles(self) -> list[tuple[int, int, int, int, int]]:
        """(image, oy0, rows, ox0, cols) of every output tile, in order."""
        return _spatial_tiles(self.n, self.oh, self.ow, self.oh_t, self.ow_t)

    def __str__(self) -> str:
        w = "resident" if self.resident else "streamed"
        return (f"{self.kind}/{self.mode} out {self.oh}x{self.ow}x{self.cout} tile "
                f"{self.oh_t}x{self.ow_t} ({self.n_spatial} tiles) x {self.coc} chunks; K "
                f"{len(self.ktiles)} tiles ({self.kh}x{self.kw}x{self.cj}) in {self.kgroups} "
                f"group(s); block {self.br}x{self.bc}x{self.chunks_per_group} x{self.in_slots}; "
                f"weights {w} ({0 if self.tiles is None else len(self.tiles)} tiles); "
                f"est {self.est_cycles} cycles")


@dataclass
class PoolPlan:
    """A ``maxpool`` node: ELTWISE MAX over window offsets, per (output tile, channel chunk)."""

    n: int
    h: int
    w: int
    c: int
    oh: int
    ow: int
    kh: int
    kw: int
    sy: int
    sx: int
    dy: int
    dx: int
    pads: tuple[int, int, int, int]
    cj: int
    oh_t: int
    ow_t: int
    br: int
    bc: int

    def spatial_tiles(self) -> list[tuple[int, int, int, int, int]]:
        return _spatial_tiles(self.n, self.oh, self.ow, self.oh_t, self.ow_t)

    def __str__(self) -> str:
        return (f"maxpool {self.kh}x{self.kw}/{self.sy} out {self.oh}x{self.ow}x{self.c} tile "
                f"{self.oh_t}x{self.ow_t} x {self.cj} chunks; block {self.br}x{self.bc}")


@dataclass
class EltPlan:
    """``add``/``clamp``/``copy``: output tiles x channel chunks through the vector unit."""

    n: int
    h: int
    w: int
    c: int
    cj: int
    oh_t: int
    ow_t: int

    def spatial_tiles(self) -> list[tuple[int, int, int, int, int]]:
        return _spatial_tiles(self.n, self.h, self.w, self.oh_t, self.ow_t)

    def __str__(self) -> str:
        return (f"eltwise {self.n}x{self.h}x{self.w}x{self.c} tile {self.oh_t}x{self.ow_t} x "
                f"{self.cj} chunks")


@dataclass
class ReorderPlan:
    """``reorder``: NHWC <-> row-major byte permutation, one byte per SPAD row, per image row
    and block of channels."""

    n: int
    h: int
    w: int
    c: int
    cb: int               # channels per item
    to_rows: bool
    wb: int = 0           # pixels per item (0: the whole image row); wide rows are split

    @property
    def pixels(self) -> int:
        """Pixels per item."""
        return self.wb or self.w

    def items(self) -> list[tuple[int, int, int, int, int, int]]:
        """(image, row, x0, pixels, c0, channels) of every item."""
        wb = self.pixels
        return [(b, y, x0, min(wb, self.w - x0), c0, min(self.cb, self.c - c0))
                for b in range(self.n) for y in range(self.h) for x0 in range(0, self.w, wb)
                for c0 in range(0, self.c, self.cb)]

    def __str__(self) -> str:
        d = "NHWC->rows" if self.to_rows else "rows->NHWC"
        pieces = f" x {self.wb} px" if self.wb else ""
        return (f"reorder {d} {self.n}x{self.h}x{self.w}x{self.c} in blocks of {self.cb} ch"
                f"{pieces}")


@dataclass
class GatherPlan:
    """``gather``: blocks of at most ``gather_max`` indices x column chunks of the table."""

    rows: int
    width: int
    cj: int
    block: int

    def __str__(self) -> str:
        return f"gather {self.rows} rows x {self.width} B in blocks of {self.block}"


@dataclass
class AggPlan:
    """``conv`` of kind ``agg`` (``Y = A X``, A constant; see
    :mod:`npu.compiler.passes.families`): output tiles of ``mt`` node rows x ``fg`` feature
    chunks of ``cols``; per tile and reduction block ``kb`` of ``rows`` nodes, the tile's
    non-zero ``rows x rows`` blocks of ``A`` (``tiles``, in order of tile, kb, i-block) are
    loaded once and stream through the array under each activation tile ``X[kb, chunk]``,
    PRELOADed as the weights."""

    n: int
    k: int
    f: int
    mt: int
    fbs: int                        # feature chunks of cols
    fg: int                         # feature chunks per output tile (ACC slots)
    x_resident: bool = False        # X's chunks stay in SPAD (loaded once per k-block)
    # (output tile, kb) -> (first tile index, [(i-block in the tile, blocks, offset)]):
    # runs of consecutive non-zero blocks, offset = the run's first block among the pair's.
    runs: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = \
        field(default_factory=dict, repr=False)
    tiles: np.ndarray | None = field(default=None, repr=False)
    skipped_blocks: int = 0
    total_blocks: int = 0
    macs: int = 0

    @property
    def n_tiles(self) -> int:
        return _cdiv(self.n, self.mt)

    def __str__(self) -> str:
        return (f"agg {self.n}x{self.k} @ {self.k}x{self.f}: tile {self.mt} rows x "
                f"{self.fg} of {self.fbs} chunk(s); {len(self.runs)} (tile, k-block) pairs, "
                f"{0 if self.tiles is None else len(self.tiles)} non-zero A blocks; X "
                f"{'resident' if self.x_resident else 'streamed'}")


AGG_MAX_TILE = 1024     # output rows per ACC tile of an aggregation (the ACC bounds it)
AGG_SLOTS = 4           # SPAD slots for the A blocks (and streamed X tiles) of items in flight


def plan_agg(node: Node, graph: Graph, cfg: NPUConfig) -> AggPlan:
    """The tiles of ``Y = A X``: only the non-zero ``rows x rows`` blocks of A are kept."""
    from npu.isa import VECTOR_PARAM_ROWS

    r = cfg.rows
    adj = node.attrs["adj"]
    n, k = adj.shape
    f = geometry(graph.tensors[node.inputs[0]])[3]
    nb, kbn = _cdiv(n, r), _cdiv(k, r)
    fbs = _cdiv(f, cfg.cols)
    free = cfg.acc_rows - _al(VECTOR_PARAM_ROWS, r)     # two ACC slots of fg x mt rows
    fg = max(1, min(fbs, free // (2 * r)))
    ops = 1 + sum(1 for st in node.attrs.get("epilogue", []) if st.other is not None)
    # SPAD: streamed X tiles and A blocks in AGG_SLOTS slots, output (and operand) slots x 2.
    spad_mt = (cfg.spad_rows - AGG_SLOTS * fg * r) // (AGG_SLOTS + 2 * ops * fg)
    mt = min(nb * r, AGG_MAX_TILE, free // (2 * fg) // r * r, spad_mt // r * r)
    if mt < r:
        raise CompileError("aggregation does not fit the accumulator and scratchpad",
                           node.name, node.onnx_op)
    pad = np.zeros((nb * r, kbn * r), np.int8)
    pad[:n, :k] = adj
    blocks = pad.reshape(nb, r, kbn, r).transpose(0, 2, 1, 3)      # [ib, kb, r, r]
    nz = blocks.any(axis=(2, 3))
    per = mt // r
    tiles, runs = [], {}
    for t in range(_cdiv(n, mt)):
        for kb in range(kbn):
            ibs = [ib for ib in range(t * per, min(nb, (t + 1) * per)) if nz[ib, kb]]
            if not ibs:
                continue
            first, lst = len(tiles), []
            for j, ib in enumerate(ibs):
                tiles.append(blocks[ib, kb])
                if lst and lst[-1][0] + lst[-1][1] == ib - t * per:
                    lst[-1] = (lst[-1][0], lst[-1][1] + 1, lst[-1][2])
                else:
                    lst.append((ib - t * per, 1, j))
            runs[(t, kb)] = (first, lst)
    arr = np.stack(tiles) if tiles else np.zeros((0, r, r), np.int8)
    # Resident X: one group of feature chunks (so nothing evicts it) that fits SPAD.
    resident = fg == fbs and \
        fg * kbn * r + AGG_SLOTS * mt + 2 * ops * fg * mt <= cfg.spad_rows
    return AggPlan(n, k, f, mt, fbs, fg, resident, runs, arr, int(nz.size - nz.sum()),
                   int(nz.size), n * k * f)


# --------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------

def _dense_weights(node: Node, cin: int) -> np.ndarray:
    """[Cout, Cin, KH, KW] int8 weights with groups expanded to a block-diagonal matrix."""
    w = node.attrs["weight"]
    g = int(node.attrs.get("group", 1))
    if g == 1:
        return w
    cout, cig = w.shape[0], w.shape[1]
    cog = cout // g
    if cig * g != cin or cog * g != cout:
        raise CompileError(f"group={g} does not divide channels {cin}->{cout}", node.name,
                           node.onnx_op)
    dense = np.zeros((cout, cin) + w.shape[2:], dtype=np.int8)
    for gi in range(g):
        dense[gi * cog:(gi + 1) * cog, gi * cig:(gi + 1) * cig] = w[gi * cog:(gi + 1) * cog]
    return dense


def conv_tiles(plan: ConvPlan, node: Node, rows: int) -> np.ndarray:
    """All weight tiles [coc, n_ktiles, rows(lanes), cols(outputs)] in ktile order."""
    r = rows
    if plan.kind == "avgpool":
        nk = len(plan.ktiles)
        tiles = np.zeros((plan.coc, nk, r, r), dtype=np.int8)
        eye = np.eye(r, dtype=np.int8)
        for m in range(plan.coc):
            width = min(r, plan.c - m * r)
            ident = np.zeros((r, r), dtype=np.int8)
            ident[:width, :width] = eye[:width, :width]
            for k, (_, _, j) in enumerate(plan.ktiles):
                if j == m:
                    tiles[m, k] = ident
        return tiles
    if "k_parts" in node.attrs:
        w = split_k_weight(node, r)                  # each input part on its own K chunks
    else:
        w = _dense_weights(node, plan.c)             # [Cout, Cin, KH, KW]
    cout = w.shape[0]
    if plan.mode == "packed":
        kwc = plan.kw * plan.c
        # lane b of a kernel row = byte b of kw*C neighbouring NHWC bytes: (kx, c) = divmod
        wk = w.transpose(0, 2, 3, 1).reshape(cout, plan.kh, kwc)  # [Cout, KH, KW*C]
        wp = np.zeros((plan.coc * r, plan.kh, plan.cj * r), dtype=np.int8)
        wp[:cout, :, :kwc] = wk
        t = wp.reshape(plan.coc, r, plan.kh, plan.cj, r).transpose(0, 3, 2, 4, 1)
        return np.ascontiguousarray(t).reshape(plan.coc, plan.cj * plan.kh, r, r)
    wp = np.zeros((plan.coc * r, plan.cj * r, plan.kh, plan.kw), dtype=np.int8)
    wp[:cout, :w.shape[1]] = w
    # [m, co, j, ci, ky, kx] -> [m, j, ky, kx, ci, co]: ktile order j, ky, kx
    t = wp.reshape(plan.coc, r, plan.cj, r, plan.kh, plan.kw).transpose(0, 2, 4, 5, 3, 1)
    return np.ascontiguousarray(t).reshape(plan.coc, plan.cj * plan.kh * plan.kw, r, r)


def _ktiles(plan: ConvPlan) -> list[tuple[int, int, int]]:
    if plan.mode == "packed":
        return [(ky, 0, j) for j in range(plan.cj) for ky in range(plan.kh)]
    return [(ky, kx, j) for j in range(plan.cj) for ky in range(plan.kh) for kx in range(plan.kw)]


def _sequences(plan: ConvPlan, all_tiles: np.ndarray) -> None:
    """Fill plan.seq/tiles: nonzero tiles per (m, kg), consecutive duplicates dropped."""
    nk = len(plan.ktiles)
    nonzero = all_tiles.reshape(plan.coc, nk, -1).any(axis=2)
    nonzero[~nonzero.any(axis=1), 0] = True   # an all-zero chunk still writes its ACC rows
    group_of = np.array([j // plan.chunks_per_group for (_, _, j) in plan.ktiles])
    # Emission order: m, then K group, then ktile.
    order_m, order_k = [], []
    for m in range(plan.coc):
        ks = np.flatnonzero(nonzero[m])
        ks = ks[np.argsort(group_of[ks], kind="stable")]
        order_m.append(np.full(len(ks), m))
        order_k.append(ks)
    om = np.concatenate(order_m)
    ok = np.concatenate(order_k)
    flat = all_tiles[om, ok]                                   # [n, rows, cols] in order
    dup = np.zeros(len(om), dtype=bool)
    if len(om) > 1:
        dup[1:] = (flat[1:] == flat[:-1]).reshape(len(om) - 1, -1).all(axis=1)
    tile_id = np.cumsum(~dup) - 1
    plan.tiles = np.ascontiguousarray(flat[~dup])
    seq: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for m, k, d, t in zip(om.tolist(), ok.tolist(), dup.tolist(), tile_id.tolist()):
        seq.setdefault((m, int(group_of[k])), []).append((k, -1 if d else t))
    plan.seq = seq


def _block_dims(mode: str, oh_t: int, ow_t: int, p: dict[str, int]) -> tuple[int, int]:
    if mode == "rows":
        return oh_t, ow_t
    br = (oh_t - 1) * p["sy"] + (p["kh"] - 1) * p["dy"] + 1
    if mode == "packed":
        return br, ow_t
    return br, (ow_t - 1) * p["sx"] + (p["kw"] - 1) * p["dx"] + 1


def plan_conv(node: Node, graph: Graph, cfg: NPUConfig, spad_budget: int,
              extra_operands: int) -> ConvPlan:
    """Choose mode, tile, K groups and weight residency of a conv/dense/avgpool node."""
    x = graph.tensors[node.inputs[0]]
    y = graph.tensors[node.outputs[0]]
    n, h, w, c = geometry(x)
    _, oh, ow, cout = geometry(y)
    r = cfg.rows
    a = node.attrs
    c_macs = c
    if "k_parts" in a:        # split-K (see mlp): the inputs' chunks one after the other
        c_macs = sum(a["k_parts"])
        c = sum(_cdiv(k, r) for k in a["k_parts"]) * r
    if "out_parts" in a:      # fused siblings (see mlp): outputs side by side on chunks
        cout = int(a["weight"].shape[0])
    kh, kw = a["kernel"]
    sy, sx = a["strides"]
    dy, dx = a["dilations"]
    pads = tuple(a["pads"])
    kind = "avgpool" if node.op == "avgpool" else a.get("kind", "conv")
    p = dict(kh=kh, kw=kw, sy=sy, sx=sx, dy=dy, dx=dx)
    coc = _cdiv(cout, r)
    modes = []
    if kh == kw == 1 and pads == (0, 0, 0, 0):
        modes.append(("rows", _cdiv(c, r)))
    else:
        modes.append(("std", _cdiv(c, r)))
        if kind == "conv" and c <= PACKED_MAX_C and dx == 1 and int(a.get("group", 1)) == 1:
            pj = _cdiv(kw * c, r)
            if pj * kh < _cdiv(c, r) * kh * kw:
                modes.insert(0, ("packed", pj))
    mode, cj = modes[0]
    macs = n * oh * ow * sum(p_["channels"] for p_ in out_parts(node)) * kh * kw * \
        (c_macs // int(a.get("group", 1))) if kind != "avgpool" else 0
    if kind == "avgpool":
        macs = 0
    # Which weight tiles are nonzero decides residency and per-item weight rows.
    proto = ConvPlan(kind, mode, n, h, w, c, oh, ow, cout, kh, kw, sy, sx, dy, dx, pads, cj,
                     coc, 1, 1, cj, True, 1, 1, 1)
    proto.ktiles = _ktiles(proto)
    j_of = np.array([j for (_, _, j) in proto.ktiles])
    if kind == "avgpool":
        all_tiles = None
        nonzero = j_of[None, :] == np.arange(coc)[:, None]
        unique_total = 1 + int(cout % r != 0)
    else:
        all_tiles = conv_tiles(proto, node, r)
        nonzero = all_tiles.reshape(coc, len(proto.ktiles), -1).any(axis=2)
        nonzero[~nonzero.any(axis=1), 0] = True    # an all-zero chunk still runs one tile
        unique_total = int(nonzero.sum())
    acc_total = cfg.acc_rows
    best: ConvPlan | None = None
    for n_sp in _row_splits(oh):
        oh_t = _cdiv(oh, n_sp)
        # Two aligned ACC slots plus the parameter rows must fit (a 10,000-row GNN layer).
        slot_max = (acc_total - _al(6, r)) // 2 // r * r
        widths = _col_tiles(ow, slot_max // max(oh_t, 1))
        if mode == "rows" and widths and cj * oh_t * widths[0] > spad_budget // 2:
            # The whole reduction of a full-width tile does not fit: K groups would reload
            # the input block for every output chunk (a GNN aggregation over 10,000 nodes
            # with 625 chunks). Narrower tiles may hold all of K at once; the cost model picks.
            widths += sorted({_cdiv(ow, k) for k in (2, 3, 4, 8)} - set(widths), reverse=True)
        for ow_t in widths:
            mt = oh_t * ow_t
            params_res = 2 * _al(mt, r) + _al(3 * coc, r) <= acc_total
            if 2 * _al(mt, r) + _al(6, r) > acc_total or mt < 1:
                continue
            br, bc = _block_dims(mode, oh_t, ow_t, p)
            if br > 4095 or bc > 65535:
                continue
            for g in _group_sizes(cj):
                ngroups = _cdiv(cj, g)
                block = g * br * bc
                n_sp_tiles = n * _cdiv(oh, oh_t) * _cdiv(ow, ow_t)
                single = n_sp_tiles == 1 and ngroups == 1
                in_slots = 1 if single else 2
                w_rows_total = unique_total * r
                per_group = np.zeros((coc, ngroups), dtype=np.int64)
                np.add.at(per_group, (slice(None), j_of // g), nonzero.astype(np.int64))
                top_sub = max(1, min(W_SUB_MAX, 1 if kind == "avgpool" else
                                     int(per_group.max())))
                fixed = 2 * _al(mt, r) * (1 + extra_operands)
                for resident in (True, False):
                    # Streamed: the largest ring sub-block that fits (fewer LOADs).
                    subs = [1] if resident else sorted(
                        {top_sub} | {x for x in (32, 16, 8, 4) if x < top_sub}, reverse=True)
                    for w_sub in subs:
                        wr = w_rows_total if resident else W_RING * w_sub * r
                        need = in_slots * _al(block, r) + wr + fixed + 4 * r  # + rounding
                        if need <= spad_budget:
                            break
                    else:
                        continue
                    n_mm = int(nonzero.sum()) * n_sp_tiles
                    est = _estimate(cfg, n_mm, coc * n_sp_tiles, ngroups, mt, block,
                                    w_rows_total, resident, n_sp_tiles)
                    if ow_t < ow:
                        # Full-width row bands finish rows in order, which lets the next
                        # layer (a pool) start early: prefer them unless clearly worse.
                        est += est // 50
                    if best is None or est < best.est_cycles:
                        best = ConvPlan(kind, mode, n, h, w, c, oh, ow, cout, kh, kw, sy, sx,
                                        dy, dx, pads, cj, coc, oh_t, ow_t, g, resident,
                                        in_slots, br, bc, params_resident=params_res,
                                        w_sub=w_sub, est_cycles=est, macs=macs)
    if best is None:
        raise CompileError(f"no tiling fits SPAD ({cfg.spad_rows} rows) and ACC "
                           f"({cfg.acc_rows} rows) of {cfg.name}", node.name, node.onnx_op)
    best.ktiles = proto.ktiles
    if kind == "avgpool":
        _avg_sequences(best, r)
    else:
        _sequences(best, all_tiles)
    return best


def _avg_sequences(plan: ConvPlan, r: int) -> None:
    """Average pooling: item (m, kg) runs the identity tile over every window offset of
    chunk m (once preloaded, it stays active: consecutive duplicates are not reloaded)."""
    eye = np.eye(r, dtype=np.int8)
    part = plan.cout % r
    tiles = [eye]
    if part:
        p = np.zeros((r, r), dtype=np.int8)
        p[:part, :part] = eye[:part, :part]
        tiles.append(p)
    seq: dict[tuple[int, int], list[tuple[int, int]]] = {}
    prev = -1
    for m in range(plan.coc):
        tid = 1 if (part and m == plan.coc - 1) else 0
        kg = m // plan.chunks_per_group
        lst = []
        for k, (_, _, j) in enumerate(plan.ktiles):
            if j != m:
                continue
            lst.append((k, -1 if tid == prev else tid))
            prev = tid
        seq[(m, kg)] = lst
    plan.seq = seq
    plan.tiles = np.stack(tiles)


def _row_splits(oh: int) -> list[int]:
    """Numbers of row tiles worth trying: every distinct balanced split of ``oh`` rows."""
    seen, out = set(), []
    for k in range(1, oh + 1):
        t = _cdiv(oh, k)
        if t not in seen:
            seen.add(t)
            out.append(k)
    return out


def _col_tiles(ow: int, limit: int) -> list[int]:
    """Column tile widths: the whole row when it fits, else balanced splits under ``limit``."""
    if limit < 1:
        return []
    if ow <= limit:
        return [ow]
    k = _cdiv(ow, limit)
    return [_cdiv(ow, k)]


def _group_sizes(cj: int) -> list[int]:
    """Reduction chunks per input block worth trying: the largest balanced splits, then
    powers of two down to one chunk (small machines, wide layers)."""
    seen, out = set(), []
    for k in range(1, cj + 1):
        g = _cdiv(cj, k)
        if g not in seen:
            seen.add(g)
            out.append(g)
        if len(out) >= 12:
            break
    for g in (64, 32, 16, 8, 4, 2, 1):
        if g < cj and g not in seen:
            seen.add(g)
            out.append(g)
    return out


def _estimate(cfg: NPUConfig, n_mm: int, n_items: int, ngroups: int, mt: int, block: int,
              w_rows: int, resident: bool, n_sp: int) -> int:
    """Cycles: the slower of the array and the LD DMA, plus per-item overhead and the time
    to the first matmul (about one tile of input)."""
    pre = cfg.rows + 1                       # a PRELOAD per tile paces tiny matmuls
    lead = cfg.rows + cfg.cols + cfg.rows    # a bank is free again this long after its matmul
    per_tile = max(mt, pre, (lead + 1) // 2)
    ex = n_mm * per_tile
    beats = _cdiv(cfg.rows, cfg.dram_beat_bytes)
    reloads = 1 if ngroups == 1 else max(1, n_items // max(n_sp, 1))
    in_loads = n_sp * block * ngroups * reloads
    w_loads = w_rows * (1 if resident else n_sp)
    ld = (in_loads + w_loads) * beats
    return int(max(ex, ld) + n_items * ngroups * _ITEM_OVERHEAD + mt * beats)


# --------------------------------------------------------------------------------------------
# Pooling and elementwise
# --------------------------------------------------------------------------------------------

def plan_maxpool(node: Node, graph: Graph, cfg: NPUConfig, spad_budget: int) -> PoolPlan:
    x = graph.tensors[node.inputs[0]]
    y = graph.tensors[node.outputs[0]]
    n, h, w, c = geometry(x)
    _, oh, ow, _ = geometry(y)
    a = node.attrs
    kh, kw = a["kernel"]
    sy, sx = a["strides"]
    dy, dx = a["dilations"]
    pads = tuple(a["pads"])
    cj = _cdiv(c, cfg.rows)
    limit = min(4095, max(1, spad_budget // 8))
    best = None
    for n_sp in _row_splits(oh):
        oh_t = _cdiv(oh, n_sp)
        for ow_t in _col_tiles(ow, min(4095, limit // max(oh_t, 1))):
            br = (oh_t - 1) * sy + (kh - 1) * dy + 1
            bc = (ow_t - 1) * sx + (kw - 1) * dx + 1
            need = 2 * _al(br * bc, cfg.rows) + 2 * _al(oh_t * ow_t, cfg.rows) + 2 * cfg.rows
            # At most a quarter of SPAD: the pool can then run beside the layer producing
            # its input (emit overlaps them when their buffers are disjoint).
            if need <= spad_budget // 4 and oh_t <= 4095 and ow_t <= 4095:
                best = PoolPlan(n, h, w, c, oh, ow, kh, kw, sy, sx, dy, dx, pads, cj, oh_t,
                                ow_t, br, bc)
                break
        if best is not None:
            break
    if best is None:
        oh_t, ow_t = 1, 1
        br, bc = (kh - 1) * dy + 1, (kw - 1) * dx + 1
        if 2 * _al(br * bc, cfg.rows) + 4 * cfg.rows > spad_budget:
            raise CompileError(f"no MaxPool tiling fits SPAD of {cfg.name}", node.name,
                               node.onnx_op)
        best = PoolPlan(n, h, w, c, oh, ow, kh, kw, sy, sx, dy, dx, pads, cj, 1, 1, br, bc)
    return best


def plan_eltwise(node: Node, graph: Graph, cfg: NPUConfig, spad_budget: int) -> EltPlan:
    y = graph.tensors[node.outputs[0]]
    n, h, w, c = geometry(y)
    operands = 2 if node.op == "add" else 1
    limit = max(1, min(4095 * 4095, spad_budget // (2 * (operands + 1)) - 2 * cfg.rows))
    if node.attrs.get("ride_with"):
        limit = min(limit, _RIDER_ROWS)   # small tiles between a matmul's items (see mlp)
    ow_t = min(w, 4095, limit)
    oh_t = max(1, min(h, 4095, limit // ow_t))
    return EltPlan(n, h, w, c, _cdiv(c, cfg.rows), oh_t, ow_t)


def plan_reorder(node: Node, graph: Graph, cfg: NPUConfig, spad_budget: int) -> ReorderPlan:
    to_rows = node.attrs["to"] != "NHWC"
    cl = graph.tensors[node.inputs[0] if to_rows else node.outputs[0]]
    n, h, w, c = geometry(cl)
    slot = spad_budget // 2 - 2 * cfg.rows
    if slot < 1:
        raise CompileError("no scratchpad room to reorder", node.name, node.onnx_op)
    # Rows wider than a slot (a 10,000-node GNN feature matrix) go in pieces of wb pixels.
    wb = min(w, slot, 65535)
    cb = max(1, min(c, slot // wb, 65535))
    return ReorderPlan(n, h, w, c, cb, to_rows, 0 if wb == w else wb)


def plan_gather(node: Node, graph: Graph, cfg: NPUConfig, spad_budget: int) -> GatherPlan:
    table = graph.tensors[node.inputs[0]]
    idx = graph.tensors[node.inputs[1]]
    rows = max(1, idx.size)
    width = geometry(table)[3]
    block = max(1, min(cfg.gather_max, spad_budget // 4))
    return GatherPlan(rows, width, _cdiv(width, cfg.rows), block)


def _extra_operands(node: Node) -> int:
    return sum(1 for s in node.attrs.get("epilogue", []) if s.other is not None)


def tile(graph: Graph, config: NPUConfig) -> Graph:
    """Attach a plan to every NPU node (``node.plan``); raises CompileError if none fits."""
    budget = config.spad_rows
    for node in graph.nodes:
        if node.device != "npu":
            continue
        if node.op == "conv" and node.attrs.get("kind") == "agg":
            node.plan = plan_agg(node, graph, config)
        elif node.op in ("conv", "avgpool"):
            node.plan = plan_conv(node, graph, config, budget, _extra_operands(node))
        elif node.op == "maxpool":
            node.plan = plan_maxpool(node, graph, config, budget)
        elif node.op in ("add", "clamp", "copy"):
            node.plan = plan_eltwise(node, graph, config, budget)
        elif node.op == "gather":
            node.plan = plan_gather(node, graph, config, budget)
        elif node.op == "reorder":
            node.plan = plan_reorder(node, graph, config, budget)
    return graph
