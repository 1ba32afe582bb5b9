"""npu.program: the .npub file round-trips, and every defect raises ProgramError (only)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import json_values, valid_programs

from npu.builder import ProgramBuilder
from npu.isa import LAYOUTS, PRESETS, Opcode, address_error, decode_words
from npu.program import FORMAT_VERSION, MAGIC, Binding, Program, ProgramError, Segment, load, save

PROPS = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------
# A file surgeon: edit the parts of a valid file and write a consistent CRC (so the edit
# reaches the checks behind the checksum).
# --------------------------------------------------------------------------------------------

def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, everything between the header padding and the CRC)."""
    (head_len,) = struct.unpack_from("<I", data, 8)
    pos = 12 + head_len
    pos += -pos % 8
    return json.loads(data[12:12 + head_len]), data[pos:-4]


def join(header: Any, body: bytes, magic: bytes = MAGIC, version: int = FORMAT_VERSION,
         raw_header: bytes | None = None) -> bytes:
    head = json.dumps(header).encode() if raw_header is None else raw_header
    out = magic + struct.pack("<HHI", version, 0, len(head)) + head
    out += b"\0" * (-len(out) % 8) + body
    return out + struct.pack("<I", zlib.crc32(out))


def edit(data: bytes, header_fn: Callable[[dict], Any] | None = None,
         body_fn: Callable[[bytes], bytes] | None = None, **kw: Any) -> bytes:
    header, body = split(data)
    if header_fn:
        header_fn(header)  # edits in place
    if body_fn:
        body = body_fn(body)
    return join(header, body, **kw)


def small_program() -> Program:
    """A program with two segments, an input, an output, regions and metadata."""
    b = ProgramBuilder("npu16")
    x = b.input("x", (4, 16), "int8", layout="NC", scale=0.5, zero_point=3)
    y = b.output("y", (4, 16), "int8")
    w = b.segment("w", np.arange(256, dtype=np.uint8))
    p = b.segment("p", np.arange(48, dtype=np.int32))
    b.region("load")
    b.load(dram_addr=w, dst=16, n_inner=16, row_bytes=16, dram_stride_inner=16, signal="EX")
    b.load(dram_addr=x.addr, dst=0, n_inner=4, row_bytes=16, dram_stride_inner=16, signal="EX")
    b.load(dram_addr=p, dst=8, n_inner=3, row_bytes=64, dram_stride_inner=64, mem=1,
           signal="VX")
    b.region("compute")
    b.preload(16, wait="LD")
    b.matmul(spad_addr=0, acc_addr=0, n_inner=4, swap=1, wait="LD", signal="VX")
    b.vector(acc_addr=0, spad_addr=32, param_addr=8, n=4, wait=("EX", "LD"), signal="ST")
    b.store(dram_addr=y.addr, src=32, n_inner=4, row_bytes=16, dram_stride_inner=16, wait="VX")
    return b.build(metadata={"source": "test", "nested": {"a": [1, 2.5, None]}})


@pytest.fixture
def data() -> bytes:
    return small_program().to_bytes()


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def assert_same_program(a: Program, b: Program) -> None:
    assert a.config == b.config and a.dram_bytes == b.dram_bytes
    assert np.array_equal(a.instructions, b.instructions)
    assert a.segments == b.segments
    assert a.inputs == b.inputs and a.outputs == b.outputs
    assert [tuple(r) for r in a.regions] == [tuple(r) for r in b.regions]
    assert a.metadata == b.metadata


def test_small_program_round_trip(data: bytes, tmp_path) -> None:
    prog = Program.from_bytes(data)
    assert_same_program(prog, small_program())
    assert prog.to_bytes() == data
    save(prog, tmp_path / "p.npub")
    assert (tmp_path / "p.npub").read_bytes() == data
    assert_same_program(load(tmp_path / "p.npub", PRESETS["npu16"]), prog)
    assert data[:4] == b"NPUB" and struct.unpack_from("<H", data, 4)[0] == FORMAT_VERSION
    assert b"pickle" not in data and b"\x80\x04" not in data[:2]


def test_views(data: bytes) -> None:
    prog = Program.from_bytes(data)
    dram = prog.initial_dram()
    for seg in prog.segments:
        assert dram[seg.addr:seg.end].tobytes() == seg.data
    assert prog.region_of(0) == "load" and prog.region_of(3) == "compute"
    assert prog.region_of(prog.n_instructions - 1) == "compute"
    assert [i.opcode for i in prog.decoded()][-1] == Opcode.HALT
    assert prog.inputs[0].nbytes == 64


@PROPS
@given(valid_programs())
def test_random_programs_round_trip(prog: Program) -> None:
    data = prog.to_bytes()
    again = Program.from_bytes(data, prog.config)
    assert_same_program(again, prog)
    assert again.to_bytes() == data


# --------------------------------------------------------------------------------------------
# Corruption: random damage raises ProgramError and nothing else
# --------------------------------------------------------------------------------------------

def _load_or_program_error(data: bytes) -> None:
    try:
        Program.from_bytes(data)
    except ProgramError:
        pass


@st.composite
def corruptions(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_programs()).to_bytes())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


@PROPS
@given(corruptions())
def test_random_corruptions_raise_only_program_error(data: bytes) -> None:
    _load_or_program_error(data)


@st.composite
def header_mutations(draw: st.DrawFn) -> bytes:
    """Valid CRC, but a random value somewhere in the header JSON replaced (or removed)."""
    header, body = split(draw(valid_programs()).to_bytes())
    node: Any = header
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = draw(json_values | st.integers(-(1 << 40), 1 << 40))
        break
    return join(header, body)


@PROPS
@given(header_mutations())
def test_header_mutations_raise_only_program_error(data: bytes) -> None:
    _load_or_program_error(data)


@PROPS
@given(st.data())
def test_instruction_mutations_raise_only_program_error(draw: st.DataObject) -> None:
    prog = draw.draw(valid_programs(min_instructions=1))
    header, body = split(prog.to_bytes())
    body = bytearray(body)
    pos = draw.draw(st.integers(0, prog.n_instructions * 32 - 1))
    body[pos] ^= draw.draw(st.integers(1, 255))
    try:
        loaded = Program.from_bytes(join(header, bytes(body)))
    except ProgramError:
        return
    # Accepted: then every instruction decodes and passes the scalar address check (the oracle
    # for validation's bulk screen).
    for ins in decode_words(loaded.instructions):
        assert address_error(ins, loaded.config, loaded.dram_bytes) is None


# --------------------------------------------------------------------------------------------
# Hand-made defects behind a valid checksum
# --------------------------------------------------------------------------------------------

def _set(path: list[Any], value: Any) -> Callable[[dict], None]:
    def fn(header: dict) -> None:
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return fn


def _del(key: str) -> Callable[[dict], None]:
    return lambda header: header.pop(key)


DEFECTS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "wrong magic": (lambda d: edit(d, magic=b"NPUX"), r"not an NPU program: magic b'NPUX'"),
    "wrong version": (lambda d: edit(d, version=FORMAT_VERSION + 1),
                      rf"unsupported program format version {FORMAT_VERSION + 1}"),
    "bad checksum": (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
    "tiny file": (lambda d: d[:10], r"truncated \(10 bytes\)"),
    "truncated payload": (lambda d: edit(d, body_fn=lambda b: b[:-10]),
                          r"truncated: segment 'p' runs past the end"),
    "truncated instructions": (lambda d: edit(d, body_fn=lambda b: b[:100]),
                               r"truncated: \d+ instructions do not fit"),
    "trailing bytes": (lambda d: edit(d, body_fn=lambda b: b + b"xx"),
                       "2 unexpected bytes after the last segment"),
    "header length": (lambda d: d[:8] + struct.pack("<I", 1 << 30) + d[12:-4]
                      + struct.pack("<I", zlib.crc32(d[:8] + struct.pack("<I", 1 << 30)
                                                     + d[12:-4])),
                      "header length runs past the end"),
    "header not JSON": (lambda d: join(None, split(d)[1], raw_header=b"{oops"),
                        "header is not valid JSON"),
    "header not UTF-8": (lambda d: join(None, split(d)[1], raw_header=b"\xff\xfe"),
                         "header is not valid JSON"),
    "header deeply nested": (lambda d: join(None, split(d)[1], raw_header=b"[" * 100000),
                             "header is not valid JSON"),
    "header is a list": (lambda d: join([1], split(d)[1]), "header must be a JSON object"),
    "header lacks segments": (lambda d: edit(d, _del("segments")), "header lacks 'segments'"),
    "bad config field": (lambda d: edit(d, _set(["config", "rows"], 3)),
                         r"header: NPUConfig.*rows=3"),
    "unknown config field": (lambda d: edit(d, _set(["config", "turbo"], 1)),
                             r"unknown field\(s\) \['turbo'\]"),
    "overlapping segments": (lambda d: edit(d, _set(["segments", 1, "addr"], 100)),
                             r"segment '[wp]' \[\d+, \d+\) overlaps segment '[wp]'"),
    "segment overlaps input": (lambda d: edit(d, _set(["segments", 0, "addr"], 0)),
                               r"overlaps"),
    "segment outside DRAM": (lambda d: edit(d, _set(["segments", 1, "addr"], 1 << 20)),
                             r"segment 'p' \[1048576, 1048768\) is empty or outside DRAM"),
    "negative segment": (lambda d: edit(d, _set(["segments", 0, "addr"], -4)),
                         "segment 'w' .* outside DRAM"),
    "segment size mismatch": (lambda d: edit(d, _set(["segments", 0, "size"], 255)),
                              "1 unexpected bytes"),
    "dram_bytes too small": (lambda d: edit(d, _set(["dram_bytes"], 64)), r"outside DRAM|"
                             r"instruction \d+: .* outside"),
    "dram_bytes float": (lambda d: edit(d, _set(["dram_bytes"], 4096.0)),
                         r"dram_bytes=4096\.0 must be in"),
    "n_instructions too large": (lambda d: edit(d, _set(["n_instructions"], 10 ** 9)),
                                 "instructions do not fit"),
    "n_instructions negative": (lambda d: edit(d, _set(["n_instructions"], -1)),
                                "n_instructions/segments malformed"),
    "binding bad dtype": (lambda d: edit(d, _set(["inputs", 0, "dtype"], "float64")),
                          r"input 'x': dtype 'float64' is not one of"),
    "binding bad shape": (lambda d: edit(d, _set(["inputs", 0, "shape"], [4, 0])),
                          r"input 'x': shape \(4, 0\) must be positive integers"),
    "binding shape not a list": (lambda d: edit(d, _set(["inputs", 0, "shape"], 4)),
                                 "binding is missing or mistypes"),
    "binding outside DRAM": (lambda d: edit(d, _set(["outputs", 0, "addr"], 1 << 30)),
                             r"output 'y': \[1073741824, .*outside DRAM"),
    "binding missing name": (lambda d: edit(d, lambda h: h["inputs"][0].pop("name")),
                             "binding is missing or mistypes 'name'"),
    "binding bad scale": (lambda d: edit(d, _set(["inputs", 0, "scale"], 0)),
                          r"input 'x': scale 0 must be positive"),
    "binding huge scale": (lambda d: edit(d, _set(["inputs", 0, "scale"], 10 ** 400)),
                           r"input 'x': scale \d+ must be positive and finite"),
    "binding bad zero point": (lambda d: edit(d, _set(["inputs", 0, "zero_point"], 1 << 31)),
                               "zero_point 2147483648 must be an int32"),
    "binding name twice": (lambda d: edit(d, _set(["outputs", 0, "name"], "x")),
                           "output 'x': name used twice"),
    "region out of order": (lambda d: edit(d, _set(["regions"], [[3, "a"], [1, "b"]])),
                            r"region 'b' starts at 1: regions must be in increasing order"),
    "region past the end": (lambda d: edit(d, _set(["regions"], [[0, "a"], [8, "b"]])),
                            r"region 'b' starts at 8"),
    "region malformed": (lambda d: edit(d, _set(["regions"], [[0]])),
                         r"region \(0,\) must be \(instruction index, label\)"),
    "metadata not an object": (lambda d: edit(d, _set(["metadata"], [1])),
                               "metadata must be a JSON object"),
}


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_hand_made_defects(name: str, data: bytes) -> None:
    damage, pattern = DEFECTS[name]
    with pytest.raises(ProgramError, match=pattern):
        Program.from_bytes(damage(data))


def _instr_body(data: bytes, index: int, op: Opcode, **fields: int) -> bytes:
    """The file with instruction ``index``'s fields set to new raw values."""
    header, body = split(data)
    word = int.from_bytes(body[32 * index:32 * index + 32], "little")
    for key, value in fields.items():
        f = LAYOUTS[op][key]
        mask = ((1 << f.width) - 1) << f.lsb
        word = (word & ~mask) | ((value << f.lsb) & mask)
    body = body[:32 * index] + word.to_bytes(32, "little") + body[32 * index + 32:]
    return join(header, body)


def test_out_of_range_instruction_addresses(data: bytes) -> None:
    # Instruction 1 is the LOAD of x into SPAD rows 0..3; 4 is the MATMUL.
    with pytest.raises(ProgramError, match=r"instruction 1: LOAD touches spad \[16382, 16386\)"):
        Program.from_bytes(_instr_body(data, 1, Opcode.LOAD, dst=16382))
    with pytest.raises(ProgramError, match=r"instruction 1: LOAD touches dram"):
        Program.from_bytes(_instr_body(data, 1, Opcode.LOAD, dram_addr=(1 << 32) - 8))
    with pytest.raises(ProgramError, match=r"instruction 4: MATMUL touches acc \[1022, 1026\)"):
        Program.from_bytes(_instr_body(data, 4, Opcode.MATMUL, acc_addr=1022))
    with pytest.raises(ProgramError, match=r"instruction 4: MATMUL.n_outer must be >= 1"):
        Program.from_bytes(_instr_body(data, 4, Opcode.MATMUL, n_outer=0))
    with pytest.raises(ProgramError, match=r"instruction 4: illegal opcode 15"):
        Program.from_bytes(_instr_body(data, 4, Opcode.MATMUL, opcode=15))
    with pytest.raises(ProgramError, match=r"instruction 4: MATMUL: reserved bits set"):
        Program.from_bytes(join(split(data)[0], _set_bit(split(data)[1], 4, 200)))


def _set_bit(body: bytes, index: int, bit: int) -> bytes:
    b = bytearray(body)
    b[32 * index + bit // 8] |= 1 << (bit % 8)
    return bytes(b)


def test_config_mismatch(data: bytes, tmp_path) -> None:
    with pytest.raises(ProgramError, match=r"built for config 'npu16', not 'npu4' \(differs in "
                                           r"\['name', 'rows', 'cols'"):
        Program.from_bytes(data, PRESETS["npu4"])
    path = tmp_path / "p.npub"
    path.write_bytes(data)
    with pytest.raises(ProgramError, match="not 'npu8'"):
        load(path, PRESETS["npu8"])
    with pytest.raises(ProgramError, match="cannot read program"):
        load(tmp_path / "missing.npub")


def test_program_object_validation() -> None:
    cfg = PRESETS["npu4"]
    empty = np.zeros((0, 4), dtype=np.uint64)
    with pytest.raises(ProgramError, match=r"segment 's' \[60, 70\) is empty or outside DRAM"):
        Program(cfg, empty, 64, [Segment("s", 60, bytes(10))]).validate()
    with pytest.raises(ProgramError, match="is empty"):
        Program(cfg, empty, 64, [Segment("s", 0, b"")]).validate()
    with pytest.raises(ProgramError, match=r"dram_bytes=0 must be in"):
        Program(cfg, empty, 0).validate()
    with pytest.raises(ProgramError, match=r"dram_bytes=8589934592"):
        Program(cfg, empty, 1 << 33).validate()
    with pytest.raises(ProgramError, match=r"region 'r' starts at 0"):
        Program(cfg, empty, 64, regions=[(0, "r")]).validate()
    with pytest.raises(ProgramError, match="needs a non-empty name"):
        Program(cfg, empty, 64, inputs=[Binding("", 0, (1,))]).validate()
    with pytest.raises(ProgramError, match="metadata is not JSON-serialisable"):
        Program(cfg, empty, 64, metadata={"x": float("nan")}).to_bytes()
    with pytest.raises(ProgramError, match=r"instructions must be an \(N, 4\) uint64 array"):
        Program(cfg, np.zeros(5, dtype=np.uint64), 64)
    # Outputs may overlap each other and inputs (results are written in place).
    Program(cfg, empty, 64, inputs=[Binding("a", 0, (16,))],
            outputs=[Binding("b", 8, (8,)), Binding("c", 0, (16,))]).validate()
