"""npu.isa: config validation and presets, encoding, range checks, timing formulas, addresses."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import HEADER, any_instr

from npu import isa
from npu.isa import (
    INSTR_BITS,
    INSTR_BYTES,
    LAYOUTS,
    PRESETS,
    Engine,
    Instr,
    ISAError,
    NPUConfig,
    Opcode,
    Unit,
    address_error,
    decode,
    decode_words,
    encode,
    encode_words,
    field_arrays,
    get_config,
    timing,
    timing_arrays,
)

NPU16 = PRESETS["npu16"]
PROPS = settings(max_examples=150, deadline=None)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def test_preset_sizes() -> None:
    assert NPU16 == NPUConfig() == get_config(None) == get_config("npu16")
    assert (NPU16.rows, NPU16.cols) == (16, 16)
    assert NPU16.spad_bytes == 256 * 1024
    assert NPU16.acc_bytes == 64 * 1024
    assert {"npu4", "npu8", "npu16", "npu32", "npu128"} <= set(PRESETS)
    assert [PRESETS[n].rows for n in ("npu4", "npu8", "npu32", "npu128")] == [4, 8, 32, 128]
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        assert cfg.spad_row_bytes == cfg.cols and cfg.acc_row_bytes == 4 * cfg.cols


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name: str, tmp_path) -> None:
    cfg = PRESETS[name]
    assert NPUConfig.from_json(cfg.to_json()) == cfg
    assert NPUConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert get_config(str(path)) == cfg


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        NPU16.rows = 8  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"rows": 0, "cols": 0}, r"NPUConfig\.rows must be a positive integer"),
    ({"spad_rows": -1}, r"NPUConfig\.spad_rows"),
    ({"acc_rows": "1024"}, r"NPUConfig\.acc_rows .*'1024'"),
    ({"queue_depth": True}, r"NPUConfig\.queue_depth"),
    ({"dram_latency": 2.5}, r"NPUConfig\.dram_latency"),
    ({"rows": 8}, r"square arrays .*rows=8, cols=16"),
    ({"rows": 12, "cols": 12}, r"NPUConfig\.rows must be a power of two, got 12"),
    ({"dram_beat_bytes": 24}, r"NPUConfig\.dram_beat_bytes must be a power of two"),
    ({"spad_rows": 1 << 21}, r"NPUConfig\.spad_rows=2097152 exceeds"),
    ({"gather_max": 1 << 17}, r"NPUConfig\.gather_max"),
])
def test_config_validation_names_the_field(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ISAError, match=pattern):
        NPUConfig(**kwargs)


def test_config_bad_json_and_names() -> None:
    with pytest.raises(ISAError, match=r"unknown field\(s\) \['bogus'\]"):
        NPUConfig.from_dict({"bogus": 1})
    with pytest.raises(ISAError, match="malformed"):
        NPUConfig.from_json("{not json")
    with pytest.raises(ISAError, match="JSON object"):
        NPUConfig.from_json("[1, 2]")
    with pytest.raises(ISAError, match=r"unknown config 'npu7'.*npu16"):
        get_config("npu7")
    with pytest.raises(ISAError, match="cannot read config file"):
        get_config("/nonexistent/cfg.json")


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

def test_layouts_fit_and_never_cross_words() -> None:
    for op, layout in LAYOUTS.items():
        used = 0
        for key, f in layout.items():
            assert f.lsb // 64 == (f.lsb + f.width - 1) // 64, (op, key)
            assert f.lsb + f.width <= INSTR_BITS
            mask = ((1 << f.width) - 1) << f.lsb
            assert not used & mask, f"{op.name}.{key} overlaps another field"
            used |= mask
        assert (layout["opcode"].lsb, layout["wait"].lsb, layout["signal"].lsb) == (0, 4, 8)


def test_encoding_is_fixed() -> None:
    """Bit positions as printed in docs/architecture.md (a change here is an ISA change)."""
    assert encode(Instr(Opcode.HALT)) == b"\x0a" + bytes(31)
    load = Instr(Opcode.LOAD, 0, 1 << Engine.EX, {"dram_addr": 1, "n_outer": 3})
    word = int.from_bytes(encode(load), "little")
    assert word == 1 | (0b0010 << 8) | (1 << 12) | (3 << 192)      # dram_addr [43:12]
    mm = Instr(Opcode.MATMUL, 1 << Engine.LD, 0, {"n_inner": 0xFFFF})
    assert int.from_bytes(encode(mm), "little") == 4 | (1 << 4) | (0xFFFF << 100)
    # Signed fields are two's complement: VECTOR.zero_point=-1 fills its 8 bits.
    vec = Instr(Opcode.VECTOR, fields={"zero_point": -1})
    f = LAYOUTS[Opcode.VECTOR]["zero_point"]
    assert int.from_bytes(encode(vec), "little") == 5 | (0xFF << f.lsb)


@pytest.mark.parametrize("op", list(Opcode))
def test_every_opcode_extremes_round_trip(op: Opcode) -> None:
    for pick in (lambda f: f.lo, lambda f: f.hi):
        fields = {k: pick(f) for k, f in LAYOUTS[op].items() if k not in HEADER}
        ins = Instr(op, 0, 0, fields)
        data = encode(ins)
        assert len(data) == INSTR_BYTES
        assert decode(data) == ins
        assert encode(decode(data)) == data


@PROPS
@given(any_instr())
def test_encode_decode_round_trip(ins: Instr) -> None:
    data = encode(ins)
    assert decode(data) == ins
    assert encode(decode(data)) == data
    assert ins.encode() == data


@PROPS
@given(st.lists(any_instr(), min_size=1, max_size=20))
def test_words_and_bulk_field_arrays_agree_with_decode(instrs: list[Instr]) -> None:
    words = encode_words(instrs)
    assert words.shape == (len(instrs), 4) and words.dtype == np.uint64
    assert decode_words(words) == instrs
    arrays = field_arrays(words)
    for idx, ins in enumerate(instrs):
        assert arrays["opcode"][idx] == ins.opcode
        for key, value in ins.fields.items():
            assert arrays[key][idx] == value, (ins.opcode.name, key)


@pytest.mark.parametrize("op", list(Opcode))
def test_out_of_range_values_name_the_field(op: Opcode) -> None:
    for key, f in LAYOUTS[op].items():
        if key in HEADER:
            continue
        for bad in (f.lo - 1, f.hi + 1):
            with pytest.raises(ISAError, match=rf"^{op.name}\.{key}={bad} out of range"):
                Instr(op, 0, 0, {key: bad})


def test_other_instruction_errors() -> None:
    with pytest.raises(ISAError, match="MATMUL has no field"):
        Instr(Opcode.MATMUL, fields={"n": 1})
    with pytest.raises(ISAError, match=r"MATMUL\.n_inner must be an integer"):
        Instr(Opcode.MATMUL, fields={"n_inner": 1.0})
    with pytest.raises(ISAError, match=r"MATMUL\.wait names its own engine EX"):
        Instr(Opcode.MATMUL, wait=1 << Engine.EX)
    with pytest.raises(ISAError, match=r"SYNC\.signal names its own engine ST"):
        Instr(Opcode.SYNC, signal=1 << Engine.ST, fields={"engine": 3})
    with pytest.raises(ISAError, match="HALT belongs to no engine"):
        Instr(Opcode.HALT, wait=1)
    with pytest.raises(ISAError, match=r"MATMUL\.signal=16 out of range"):
        Instr(Opcode.MATMUL, signal=16)
    with pytest.raises(ISAError, match="32 bytes"):
        decode(bytes(31))


@pytest.mark.parametrize("opcode", [0, 11, 12, 13, 14, 15])
def test_illegal_opcodes(opcode: int) -> None:
    with pytest.raises(ISAError, match=f"illegal opcode {opcode}"):
        decode(bytes([opcode]) + bytes(31))
    with pytest.raises(ISAError, match="instruction 1: illegal opcode"):
        decode_words(np.array([[10, 0, 0, 0], [opcode, 0, 0, 0]], dtype=np.uint64))


def _reserved_bits(op: Opcode) -> list[int]:
    used = 0
    for f in LAYOUTS[op].values():
        used |= ((1 << f.width) - 1) << f.lsb
    return [b for b in range(INSTR_BITS) if not used >> b & 1]


@pytest.mark.parametrize("op", list(Opcode))
def test_reserved_bits_rejected(op: Opcode) -> None:
    reserved = _reserved_bits(op)
    assert reserved, f"{op.name} has no reserved bits"
    base = int.from_bytes(encode(Instr(op, fields={"engine": 1} if op == Opcode.SYNC else {})),
                          "little")
    for bit in reserved:
        with pytest.raises(ISAError, match=f"{op.name}: reserved bits set"):
            decode((base | 1 << bit).to_bytes(INSTR_BYTES, "little"))


@PROPS
@given(any_instr(), st.data())
def test_random_reserved_bit_rejected(ins: Instr, data: st.DataObject) -> None:
    bit = data.draw(st.sampled_from(_reserved_bits(ins.opcode)))
    word = int.from_bytes(encode(ins), "little") | (1 << bit)
    with pytest.raises(ISAError, match="reserved bits"):
        decode(word.to_bytes(INSTR_BYTES, "little"))


# --------------------------------------------------------------------------------------------
# Timing contract
# --------------------------------------------------------------------------------------------

def _t(op: Opcode, cfg: NPUConfig = NPU16, **fields: int) -> tuple[Unit, int, int]:
    t = timing(Instr(op, fields=fields), cfg)
    return t.unit, t.busy, t.latency


def test_timing_spot_checks_by_hand() -> None:
    """Values worked out by hand from the formulas in docs/architecture.md (npu16: rows=cols=16,
    dram_latency=32, dram_beat_bytes=16, vx_depth=4)."""
    # LOAD: n_inner*n_outer beats of ceil(row_bytes/16); +32 latency.
    assert _t(Opcode.LOAD, n_inner=10, n_outer=2, row_bytes=16) == (Unit.LD_DMA, 20, 52)
    assert _t(Opcode.LOAD, n_inner=10, n_outer=2, row_bytes=17) == (Unit.LD_DMA, 40, 72)
    assert _t(Opcode.LOAD, n_inner=3, n_outer=1, row_bytes=64, mem=1) == (Unit.LD_DMA, 12, 44)
    assert _t(Opcode.LOAD, n_inner=5, n_outer=1, row_bytes=16, fill=1) == (Unit.LD_DMA, 5, 37)
    # GATHER: index fetch ceil(4n/16) + 32 + n*ceil(row_bytes/16); +32 latency.
    assert _t(Opcode.GATHER, n=4, row_bytes=16) == (Unit.LD_DMA, 1 + 32 + 4, 69)
    assert _t(Opcode.GATHER, n=5, row_bytes=20) == (Unit.LD_DMA, 2 + 32 + 10, 76)
    # PRELOAD: one cycle per array row.
    assert _t(Opcode.PRELOAD) == (Unit.EX_WEIGHTS, 16, 16)
    # MATMUL: one input row per cycle; the last leaves the array rows+cols later.
    assert _t(Opcode.MATMUL, n_inner=49, n_outer=1) == (Unit.EX_ARRAY, 49, 81)
    assert _t(Opcode.MATMUL, n_inner=7, n_outer=7) == (Unit.EX_ARRAY, 49, 81)
    # VECTOR: 3 parameter rows then one row per cycle; + pipeline depth.
    assert _t(Opcode.VECTOR, n=10) == (Unit.VX, 13, 17)
    assert _t(Opcode.ELTWISE, n_inner=3, n_outer=4) == (Unit.VX, 12, 16)
    assert _t(Opcode.STORE, n_inner=4, n_outer=2, row_bytes=64, mem=1) == (Unit.ST_DMA, 32, 64)
    for op in (Opcode.SYNC, Opcode.BARRIER, Opcode.HALT):
        assert _t(op) == (Unit.NONE, 1, 1)
    # Config dependence: npu4 has 4-byte beats and a 4x4 array.
    npu4 = PRESETS["npu4"]
    assert _t(Opcode.LOAD, npu4, n_inner=2, n_outer=1, row_bytes=4) == (Unit.LD_DMA, 2, 34)
    assert _t(Opcode.MATMUL, npu4, n_inner=2, n_outer=1) == (Unit.EX_ARRAY, 2, 10)
    assert _t(Opcode.PRELOAD, npu4) == (Unit.EX_WEIGHTS, 4, 4)


@PROPS
@given(st.lists(any_instr(), min_size=1, max_size=30), st.sampled_from(sorted(PRESETS)))
def test_timing_arrays_equal_scalar_timing(instrs: list[Instr], preset: str) -> None:
    cfg = PRESETS[preset]
    unit, busy, latency = timing_arrays(field_arrays(encode_words(instrs)), cfg)
    for idx, ins in enumerate(instrs):
        t = timing(ins, cfg)
        assert (unit[idx], busy[idx], latency[idx]) == (t.unit, t.busy, t.latency)
        assert t.latency >= t.busy >= 0


# --------------------------------------------------------------------------------------------
# Static addresses
# --------------------------------------------------------------------------------------------

def test_address_errors() -> None:
    def err(op: Opcode, dram: int = 4096, **fields: int) -> str | None:
        return address_error(Instr(op, fields=fields), NPU16, dram)

    assert err(Opcode.MATMUL, spad_addr=16383, n_inner=1, n_outer=1) is None
    assert err(Opcode.MATMUL, spad_addr=16384, n_inner=1, n_outer=1) == \
        "MATMUL touches spad [16384, 16385) outside [0, 16384) rows"
    assert err(Opcode.MATMUL, n_inner=0, n_outer=1) == "MATMUL.n_inner must be >= 1"
    assert err(Opcode.LOAD, n_inner=1, n_outer=1, row_bytes=17) == \
        "LOAD.row_bytes=17 exceeds the SPAD row of 16 bytes"
    assert err(Opcode.LOAD, n_inner=1, n_outer=1, row_bytes=64, mem=1, dst=1023) is None
    assert "acc" in err(Opcode.LOAD, n_inner=1, n_outer=1, row_bytes=64, mem=1, dst=1024)
    assert "dram [4090, 4106)" in err(Opcode.STORE, n_inner=1, n_outer=1, row_bytes=16,
                                      dram_addr=4090)
    assert err(Opcode.LOAD, n_inner=1, n_outer=1, row_bytes=16, dram_addr=4090, fill=1) is None
    assert "gather_max" in err(Opcode.GATHER, n=257, row_bytes=1)
    assert err(Opcode.PRELOAD, spad_addr=16384 - 16) is None
    assert err(Opcode.PRELOAD, spad_addr=16384 - 15) is not None
    assert err(Opcode.VECTOR, n=1, param_addr=1022) is not None  # 3 parameter rows
    # ELTWISE: in place element for element is fine, a shifted overlap is not.
    elt = {"n_inner": 4, "n_outer": 1, "a_stride_inner": 1, "b_stride_inner": 1, "b_addr": 100}
    assert err(Opcode.ELTWISE, a_addr=0, dst=0, **elt) is None
    assert "overlap operand A" in err(Opcode.ELTWISE, a_addr=0, dst=2, **elt)
    assert err(Opcode.ELTWISE, a_addr=0, dst=4, **elt) is None


def test_instruction_table_markdown_lists_every_opcode_and_field() -> None:
    table = isa.instruction_table_markdown()
    for op in Opcode:
        assert f"| {int(op)} | {op.name} |" in table
        busy, latency = isa.TIMING[op]
        assert f"`{busy}`" in table and f"`{latency}`" in table
        for key in LAYOUTS[op]:
            if key not in HEADER:
                assert f"| {op.name} | `{key}` |" in table


def test_eltwise_layout_by_hand() -> None:
    """ELTWISE packs its four words exactly (positions written out by hand: a change here is an
    ISA change): func 1 bit, unsigned 23-bit multipliers, a 5-bit shift."""
    def at(lsb: int, value: int) -> int:
        return value << lsb
    ins = Instr(Opcode.ELTWISE, 0, 1 << Engine.ST, dict(
        func=1, a_addr=0xFFFFF, a_mult=(1 << 23) - 1, a_zero=-1, b_addr=3, b_mult=1 << 22,
        b_zero=-128, shift=31, zero_point=5, dst=7, n_inner=0xFFF, n_outer=2, clamp_min=-2,
        clamp_max=127, a_stride_outer=1, b_stride_outer=0xFFFF, a_stride_inner=4,
        b_stride_inner=5))
    expect = (6 | (0b1000 << 8) | at(12, 1) | at(13, 0xFFFFF) | at(33, (1 << 23) - 1)
              | at(56, 0xFF)                                                    # word 0
              | at(64, 3) | at(84, 1 << 22) | at(107, 0x80) | at(115, 31) | at(120, 5)  # word 1
              | at(128, 7) | at(148, 0xFFF) | at(160, 2) | at(172, 0xFE) | at(180, 127)
              | at(192, 1) | at(208, 0xFFFF) | at(224, 4) | at(240, 5))            # word 3
    assert int.from_bytes(encode(ins), "little") == expect
    assert decode(encode(ins)) == ins
    # Bits 188..191 are the only reserved ones.
    used = sum(((1 << f.width) - 1) << f.lsb for f in LAYOUTS[Opcode.ELTWISE].values())
    assert used == ((1 << INSTR_BITS) - 1) & ~(0xF << 188)


@pytest.mark.parametrize("key, value, pattern", [
    ("func", 2, r"ELTWISE\.func=2 out of range \[0, 1\] \(1-bit unsigned\)"),
    ("a_mult", -1, r"ELTWISE\.a_mult=-1 out of range \[0, 8388607\] \(23-bit unsigned\)"),
    ("b_mult", 1 << 23, r"ELTWISE\.b_mult=8388608 out of range \[0, 8388607\]"),
    ("shift", 32, r"ELTWISE\.shift=32 out of range \[0, 31\] \(5-bit unsigned\)"),
])
def test_eltwise_field_ranges(key: str, value: int, pattern: str) -> None:
    """Only ADD and MAX encode (every 1-bit func names one); multipliers are unsigned."""
    with pytest.raises(ISAError, match=pattern):
        Instr(Opcode.ELTWISE, fields={key: value, "n_inner": 1, "n_outer": 1})
