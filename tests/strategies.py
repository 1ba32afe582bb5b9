"""Hypothesis strategies for instructions and whole program files (shared by the tests)."""

from __future__ import annotations

import dataclasses

from hypothesis import strategies as st

from npu.isa import (
    LAYOUTS,
    OPCODE_ENGINE,
    PRESETS,
    Engine,
    Instr,
    NPUConfig,
    Opcode,
    address_error,
)
from npu.program import DTYPES, Binding, Program, Segment

HEADER = ("opcode", "wait", "signal")
#: Configs random programs are built for: two presets and a custom one (inline JSON in asm).
CONFIGS = [PRESETS["npu4"], PRESETS["npu16"],
           dataclasses.replace(PRESETS["npu8"], name="custom8", dram_latency=7, queue_depth=3)]


def masks(engine: Engine | None) -> st.SearchStrategy[int]:
    """A token mask legal for an instruction of ``engine`` (never its own engine)."""
    if engine is None:
        return st.just(0)
    return st.integers(0, 15).map(lambda m: m & ~(1 << engine))


@st.composite
def any_instr(draw: st.DrawFn, opcodes: list[Opcode] | None = None) -> Instr:
    """An encodable instruction: every field anywhere in its range (addresses not checked)."""
    op = draw(st.sampled_from(opcodes or list(Opcode)))
    fields = {k: draw(st.integers(f.lo, f.hi)) for k, f in LAYOUTS[op].items()
              if k not in HEADER}
    engine = Engine(fields["engine"]) if op == Opcode.SYNC else OPCODE_ENGINE[op]
    return Instr(op, draw(masks(engine)), draw(masks(engine)), fields)


def _small_fields(draw: st.DrawFn, op: Opcode, cfg: NPUConfig) -> dict[str, int]:
    """Field values that are mostly in range for ``cfg`` with 4 KiB of DRAM."""
    count, addr, stride = st.integers(1, 4), st.integers(0, 64), st.integers(0, 8)
    f: dict[str, int] = {}
    if op in (Opcode.LOAD, Opcode.STORE, Opcode.GATHER):
        f["mem"] = draw(st.integers(0, 1))
        f["row_bytes"] = draw(st.integers(1, cfg.mem_row_bytes(f["mem"])))
        f["dram_addr"] = draw(st.integers(0, 1024))
    if op in (Opcode.LOAD, Opcode.STORE):
        local = "dst" if op == Opcode.LOAD else "src"
        f.update({local: draw(addr), f"{local}_stride_outer": draw(stride),
                  "n_inner": draw(count), "n_outer": draw(count),
                  "dram_stride_outer": draw(st.integers(0, 256)),
                  "dram_stride_inner": draw(st.integers(0, 64))})
        if op == Opcode.LOAD:
            f["fill"] = draw(st.integers(0, 1))
            f["fill_value"] = draw(st.integers(-128, 127))
    elif op == Opcode.GATHER:
        f.update(index_addr=draw(st.integers(0, 2048)), row_stride=draw(st.integers(0, 64)),
                 dst=draw(addr), n=draw(count))
    elif op == Opcode.PRELOAD:
        f["spad_addr"] = draw(addr)
    elif op == Opcode.MATMUL:
        f.update(spad_addr=draw(addr), spad_stride_outer=draw(stride),
                 spad_stride_inner=draw(stride), acc_addr=draw(addr), n_inner=draw(count),
                 n_outer=draw(count), accumulate=draw(st.integers(0, 1)),
                 swap=draw(st.integers(0, 1)))
    elif op == Opcode.VECTOR:
        f.update(acc_addr=draw(addr), spad_addr=draw(addr), param_addr=draw(addr), n=draw(count),
                 zero_point=draw(st.integers(-128, 127)), clamp_min=draw(st.integers(-128, 127)),
                 clamp_max=draw(st.integers(-128, 127)), fp32=draw(st.integers(0, 1)))
    elif op == Opcode.ELTWISE:
        for src in ("a", "b"):
            f.update({f"{src}_addr": draw(addr), f"{src}_stride_outer": draw(stride),
                      f"{src}_stride_inner": draw(stride),
                      f"{src}_mult": draw(st.integers(0, LAYOUTS[op][f"{src}_mult"].hi)),
                      f"{src}_zero": draw(st.integers(-128, 127))})
        # The destination lies above every operand (max operand end 64 + 3*8 + 3*8 < 128).
        f.update(func=draw(st.integers(0, 1)), shift=draw(st.integers(0, LAYOUTS[op]["shift"].hi)),
                 dst=draw(st.integers(128, 192)), n_inner=draw(count), n_outer=draw(count),
                 zero_point=draw(st.integers(-128, 127)), clamp_min=draw(st.integers(-128, 127)),
                 clamp_max=draw(st.integers(-128, 127)))
    elif op == Opcode.SYNC:
        f["engine"] = draw(st.integers(0, 3))
    return f


@st.composite
def valid_instr(draw: st.DrawFn, cfg: NPUConfig, dram_bytes: int = 4096) -> Instr:
    """An instruction whose every address is legal under ``cfg``."""
    op = draw(st.sampled_from(list(Opcode)))
    fields = _small_fields(draw, op, cfg)
    engine = Engine(fields["engine"]) if op == Opcode.SYNC else OPCODE_ENGINE[op]
    ins = Instr(op, draw(masks(engine)), draw(masks(engine)), fields)
    assert address_error(ins, cfg, dram_bytes) is None, address_error(ins, cfg, dram_bytes)
    return ins


#: Names with spaces, quotes, '#', '=', newlines and non-ASCII to exercise quoting.
names = st.text(min_size=0, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)


@st.composite
def valid_programs(draw: st.DrawFn, min_instructions: int = 0) -> Program:
    """A random program that passes validation: instructions (not necessarily runnable: tokens
    are random), segments and input bindings that do not overlap, outputs, regions, metadata."""
    from npu.isa import encode_words

    cfg = draw(st.sampled_from(CONFIGS))
    dram_bytes = draw(st.integers(4096, 6000))
    instrs = draw(st.lists(valid_instr(cfg, 4096), min_size=min_instructions, max_size=12))
    # Segments and inputs share a bump allocator with random gaps so that they never overlap.
    pos = 0
    segments, inputs, outputs = [], [], []
    for _ in range(draw(st.integers(0, 3))):
        pos += draw(st.integers(0, 40))
        data = draw(st.binary(min_size=1, max_size=70))
        segments.append(Segment(draw(names), pos, data))
        pos += len(data)
    used: set[str] = set()
    for kind in ("input", "output"):
        for _ in range(draw(st.integers(0, 2))):
            name = draw(names.filter(lambda s: s and s not in used))
            used.add(name)
            shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
            dtype = draw(st.sampled_from(DTYPES))
            scale = draw(st.floats(1e-30, 1e30) | st.integers(1, 1000))
            b = Binding(name, 0, shape, dtype, draw(names), scale,
                        draw(st.integers(-(1 << 31), (1 << 31) - 1)))
            if kind == "input":
                pos += draw(st.integers(0, 40))
                b = dataclasses.replace(b, addr=pos)
                pos += b.nbytes
                inputs.append(b)
            else:
                outputs.append(dataclasses.replace(
                    b, addr=draw(st.integers(0, dram_bytes - b.nbytes))))
    assert pos <= dram_bytes
    starts = sorted(draw(st.sets(st.integers(0, max(len(instrs) - 1, 0)), max_size=4))) \
        if instrs else []
    regions = [(s, draw(names)) for s in starts]
    metadata = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=3))
    return Program(cfg, encode_words(instrs), dram_bytes, segments, inputs, outputs, regions,
                   metadata)
