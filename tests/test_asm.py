"""npu.asm: text round trips to identical binaries; defaults; errors name line and field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from strategies import any_instr, valid_programs

from npu.asm import (
    AsmError,
    assemble,
    assemble_file,
    disassemble,
    format_instruction,
    parse_instruction,
)
from npu.builder import DEFAULTS, ProgramBuilder
from npu.isa import LAYOUTS, PRESETS, Engine, Instr, Opcode, encode, encode_words
from npu.program import Binding, Program, ProgramError, Segment

PROPS = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_hello_example(hello_program: Program) -> None:
    p = hello_program
    ops = [i.opcode.name for i in p.decoded()]
    assert ops == ["LOAD", "LOAD", "LOAD", "PRELOAD", "MATMUL", "VECTOR", "STORE", "HALT"]
    assert p.config == PRESETS["npu16"] and p.dram_bytes == 768
    assert [b.name for b in p.inputs] == ["x"] and [b.name for b in p.outputs] == ["y"]
    assert p.inputs[0] == Binding("x", 0, (8, 16), "int8", "NC", 0.05, 0)
    assert [s.name for s in p.segments] == ["W", "params"]
    w = np.frombuffer(p.segments[0].data, dtype=np.int8).reshape(16, 16)
    assert all(w[k, k] == 1 and w[k, (k + 1) % 16] == 1 for k in range(16)) and w.sum() == 32
    params = np.frombuffer(p.segments[1].data, dtype="<i4").reshape(3, 16)
    assert (params[0] == 0).all() and (params[1] == 1 << 30).all() and (params[2] == 31).all()
    assert p.regions == [(0, "load"), (3, "dense"), (6, "store")]
    assert p.metadata["description"].startswith("one dense layer")
    assert assemble(disassemble(p)).to_bytes() == p.to_bytes()


def test_same_program_as_the_builder() -> None:
    """The assembler's defaults are the builder's: same text, same words."""
    text = """
        LOAD dram_addr=64 dram_stride_inner=16 n_inner=4 row_bytes=16 signal=EX
        MATMUL n_inner=4 swap=1 wait=LD signal=VX
        VECTOR spad_addr=8 param_addr=4 n=4 clamp_min=0 wait=EX signal=ST
        ELTWISE func=MAX a_addr=8 b_addr=12 dst=20 n_inner=4
        STORE src=20 n_inner=4 row_bytes=16 dram_stride_inner=16 wait=VX
        SYNC engine=LD wait=ST
        HALT
    """
    b = ProgramBuilder("npu16", dram_bytes=128)
    b.load(dram_addr=64, dram_stride_inner=16, n_inner=4, row_bytes=16, signal="EX")
    b.matmul(n_inner=4, swap=1, wait="LD", signal="VX")
    b.vector(spad_addr=8, param_addr=4, n=4, clamp_min=0, wait="EX", signal="ST")
    b.eltwise(func=1, a_addr=8, b_addr=12, dst=20, n_inner=4)
    b.store(src=20, n_inner=4, row_bytes=16, dram_stride_inner=16, wait="VX")
    b.sync("LD", wait="ST")
    b.halt()
    prog = assemble(text)
    assert np.array_equal(prog.instructions, b.build(metadata={}).instructions)
    mm = prog.decoded()[1]
    assert mm.n_outer == 1 and mm.spad_stride_inner == 1 and mm.accumulate == 0
    assert mm.wait == 1 << Engine.LD and mm.signal == 1 << Engine.VX


def test_fields_left_out() -> None:
    for op in Opcode:
        fields = {k: 0 for k in LAYOUTS[op] if k not in ("opcode", "wait", "signal")}
        fields.update(DEFAULTS.get(op, {}))
        text = op.name + (" engine=LD" if op == Opcode.SYNC else "")
        assert parse_instruction(text) == Instr(op, 0, 0, fields)
    # Explicit zeros override defaults, and are printed.
    ins = parse_instruction("MATMUL n_outer=0 spad_stride_inner=0")
    assert ins.n_outer == 0 and "n_outer=0" in format_instruction(ins)


def test_value_syntax() -> None:
    ins = parse_instruction("load dram_addr=0x40 dst=0b101 n_inner=1_000 fill_value=-3 mem=acc "
                            "signal=vx,EX   # trailing comment")
    assert ins.opcode == Opcode.LOAD
    assert (ins.dram_addr, ins.dst, ins.n_inner, ins.fill_value, ins.mem) == (64, 5, 1000, -3, 1)
    assert ins.signal == (1 << Engine.VX) | (1 << Engine.EX)
    assert parse_instruction("MATMUL wait=5") == parse_instruction("MATMUL wait=LD,VX")
    assert parse_instruction("ELTWISE func=1").func == parse_instruction("ELTWISE func=MAX").func
    assert parse_instruction("SYNC engine=2").engine == Engine.VX


def test_vector_fp32_text_builder_and_binary() -> None:
    """VECTOR's fp32 flag: written fp32=1, printed only when set, the builder's keyword, its
    bit in the word, and a whole program round trip."""
    ins = parse_instruction("VECTOR acc_addr=1 spad_addr=2 param_addr=3 n=4 fp32=1")
    assert ins.fields["fp32"] == 1 and ins.fields["clamp_min"] == -128
    text = format_instruction(ins)
    assert "fp32=1" in text and parse_instruction(text) == ins
    assert "fp32" not in format_instruction(parse_instruction("VECTOR n=1 fp32=0"))
    b = ProgramBuilder("npu4")
    b.vector(acc_addr=1, spad_addr=2, param_addr=3, n=4, fp32=1)
    b.vector(acc_addr=1, spad_addr=2, param_addr=3, n=4)
    assert b.instructions[0] == ins and b.instructions[1].fields["fp32"] == 0
    word = int.from_bytes(encode(ins), "little")
    lsb = LAYOUTS[Opcode.VECTOR]["fp32"].lsb
    assert word >> lsb & 1 == 1 and word ^ (1 << lsb) == int.from_bytes(
        encode(b.instructions[1]), "little")
    prog = b.build()
    again = assemble(disassemble(prog))
    assert again.to_bytes() == prog.to_bytes()
    assert [i.fields["fp32"] for i in again.decoded()[:2]] == [1, 0]
    with pytest.raises(AsmError, match="fp32=2 out of range"):
        assemble(".config npu4\nVECTOR n=1 fp32=2\nHALT\n")


@PROPS
@given(any_instr())
def test_instruction_text_round_trip(ins: Instr) -> None:
    text = format_instruction(ins)
    assert parse_instruction(text) == ins
    assert encode(parse_instruction(text)) == encode(ins)


@PROPS
@given(valid_programs())
def test_random_programs_disassemble_assemble_identical(prog: Program) -> None:
    data = prog.to_bytes()
    text = disassemble(prog)
    again = assemble(text)
    assert again.to_bytes() == data
    assert disassemble(again) == text


def test_quoting_and_odd_names() -> None:
    odd = ['a b', 'x#y', 'q"uote', 'new\nline', 'ünï', '=', '', '.dot', '[1]', '{']
    cfg = PRESETS["npu4"]
    words = encode_words([Instr(Opcode.SYNC, fields={"engine": 0})] * len(odd))
    prog = Program(cfg, words, 4096,
                   segments=[Segment(n, 100 * i, b"\x01") for i, n in enumerate(odd)],
                   outputs=[Binding(n or "e", 0, (1,), layout=n) for n in odd[:5]],
                   regions=list(enumerate(odd)),
                   metadata={n: n for n in odd})
    text = disassemble(prog)
    assert assemble(text).to_bytes() == prog.to_bytes()


def test_custom_config_and_config_option(tmp_path) -> None:
    cfg = PRESETS["npu8"].__class__(name="mine", rows=8, cols=8, spad_rows=64, acc_rows=16)
    prog = Program(cfg, encode_words([Instr(Opcode.HALT)]), 64)
    text = disassemble(prog)
    assert ".config {" in text
    assert assemble(text).config == cfg
    (tmp_path / "mine.json").write_text(cfg.to_json())
    (tmp_path / "p.s").write_text(".config mine.json\nHALT\n")
    assert assemble_file(tmp_path / "p.s").config == cfg
    assert assemble("HALT").config == PRESETS["npu16"]
    assert assemble("HALT", config="npu4").config == PRESETS["npu4"]
    assert assemble(".config npu4\nHALT", config="npu4").config == PRESETS["npu4"]
    with pytest.raises(AsmError, match=r"^<asm>:1: \.config npu4 differs from the requested "
                                       r"config npu8"):
        assemble(".config npu4\nHALT", config="npu8")


def test_segment_files(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "w.bin").write_bytes(bytes(range(20)))
    src = tmp_path / "p.s"
    src.write_text(".segment w addr=8 file=data/w.bin\n.segment v addr=40\n  0102 03\nHALT\n")
    prog = assemble_file(src)
    assert prog.segments == [Segment("w", 8, bytes(range(20))), Segment("v", 40, b"\1\2\3")]
    assert prog.dram_bytes == 64
    text = disassemble(prog, segment_files={0: "data/w.bin"})
    assert "file=data/w.bin" in text and "0102" not in text.split(".segment v")[0]
    assert assemble(text, base_dir=tmp_path).to_bytes() == prog.to_bytes()
    with pytest.raises(AsmError, match=r"p\.s:1: \.segment w: cannot read .*nope\.bin"):
        src.write_text(".segment w addr=8 file=nope.bin\n")
        assemble_file(src)


def test_default_dram_bytes_covers_accesses() -> None:
    prog = assemble("STORE dram_addr=1000 n_inner=2 dram_stride_inner=100 row_bytes=16\nHALT")
    assert prog.dram_bytes == 1152  # 1000 + 100 + 16 = 1116, rounded up to 64
    assert assemble(".output y addr=200 shape=3 dtype=int32\nHALT").dram_bytes == 256


def test_raw_words_and_unvalidated_programs() -> None:
    bad = Program(PRESETS["npu16"], np.array([[15, 0, 0, 0], [10, 0, 0, 0]], dtype=np.uint64),
                  64)
    text = disassemble(bad)
    assert ".word 0x" + "0" * 63 + "f" in text
    again = assemble(text, validate=False)
    assert np.array_equal(again.instructions, bad.instructions)
    with pytest.raises(AsmError, match=r"^<asm>:\d+: illegal opcode 15$"):
        assemble(text)
    # Out-of-range addresses survive validate=False (for fault tests) and are named otherwise.
    oob = "MATMUL spad_addr=16383 n_inner=2\nHALT"
    assert assemble(oob, validate=False).decoded()[0].spad_addr == 16383
    with pytest.raises(AsmError, match=r"^<asm>:1: MATMUL touches spad \[16383, 16385\)"):
        assemble(oob)


ERRORS = [
    ("HALT\nHALT\nMATMUL n_inner=70000",
     r"^prog\.s:3: MATMUL\.n_inner=70000 out of range \[0, 65535\] \(16-bit unsigned\)$"),
    ("VECTOR n_inner=3", r"^prog\.s:1: VECTOR has no field 'n_inner'; fields are acc_addr, "),
    ("MATMULL n_inner=3", r"^prog\.s:1: unknown instruction 'MATMULL'; instructions are LOAD"),
    ("MATMUL n_inner=abc", r"^prog\.s:1: MATMUL\.n_inner=abc is not an integer$"),
    ("MATMUL n_inner=4 n_inner=5", r"^prog\.s:1: MATMUL\.n_inner given twice$"),
    ("MATMUL 4", r"^prog\.s:1: MATMUL: expected field=value, got '4'$"),
    ('MATMUL n_inner="4"', r"^prog\.s:1: MATMUL\.n_inner must be a number$"),
    ("MATMUL wait=LD,XY", r"^prog\.s:1: MATMUL\.wait: unknown engine 'XY'; engines are LD, "),
    ("MATMUL wait=EX", r"^prog\.s:1: MATMUL\.wait names its own engine EX$"),
    ("MATMUL wait=LD,LD", r"^prog\.s:1: MATMUL\.wait: engine LD named twice$"),
    ("HALT signal=LD", r"^prog\.s:1: HALT belongs to no engine"),
    ("LOAD mem=DRAM", r"^prog\.s:1: LOAD\.mem=DRAM: expected one of SPAD, ACC"),
    ("MATMUL n_inner=", r"^prog\.s:1: n_inner= has no value$"),
    ("MATMUL =4", r"^prog\.s:1: '=' without a name"),
    ("MATMUL n_inner=4x=5", r"^prog\.s:1: unexpected '=' at column"),
    ("HALT\n\n  LOAD n_inner=4 n_outer=1 row_bytes=0",
     r"^prog\.s:3: LOAD\.row_bytes must be >= 1$"),
    (".segment w addr=0\nHALT", r"^prog\.s:1: \.segment w has no data"),
    (".segment w addr=0", r"^prog\.s:1: \.segment w has no data"),
    (".segment w\n 00", r"^prog\.s:1: \.segment w: addr= is required$"),
    (".segment w addr=0\n 001", r"^prog\.s:2: hex group '001' has an odd number of digits$"),
    ("HALT\n00ff", r"^prog\.s:2: hex data outside a \.segment$"),
    (".segment a addr=0\n 00\n.segment b addr=0\n 00",
     r"^prog\.s: segment '[ab]' \[0, 1\) overlaps segment '[ab]'"),
    (".region a\n.region b\nHALT", r"^prog\.s:2: \.region 'a' on line 1 labels no instructions"),
    ("HALT\n.region end", r"^prog\.s:2: \.region 'end' labels no instructions$"),
    (".config npu17", r"^prog\.s:1: \.config: unknown config 'npu17'; presets are"),
    (".config {\"rows\": 3}", r"^prog\.s:1: \.config: NPUConfig: only square arrays"),
    (".config npu4\n.config npu4", r"^prog\.s:2: \.config given twice \(first on line 1\)$"),
    (".config {bad json}", r"^prog\.s:1: malformed JSON at column 9"),
    (".dram_bytes 0\nHALT", r"^prog\.s:1: \.dram_bytes 0 must be in"),
    (".dram_bytes 64\nSTORE dram_addr=60 n_inner=1 row_bytes=16",
     r"^prog\.s:2: STORE touches dram \[60, 76\) outside \[0, 64\) bytes$"),
    (".meta x=abc", r"^prog\.s:1: \.meta x=abc: the value is not JSON"),
    (".meta x=1\n.meta x=2", r"^prog\.s:2: \.meta x given twice$"),
    (".input x addr=0", r"^prog\.s:1: \.input x: shape= is required$"),
    (".input x addr=0 shape=4,a", r"^prog\.s:1: \.input x: shape=a is not an integer$"),
    (".input x addr=0 shape=4 dtype=int4",
     r"^prog\.s:1: \.input x: dtype 'int4' is not one of int8, uint8, int32, float32$"),
    (".input x addr=0 shape=4 scale=big", r"^prog\.s:1: \.input x: scale=big is not a number$"),
    (".output y addr=0 shape=4 colour=red", r"^prog\.s:1: \.output y: unknown option 'colour'"),
    (".input x addr=0 shape=0", r"^prog\.s: input 'x': shape \(0,\) must be positive"),
    (".input x addr=0 shape=4\n.output x addr=0 shape=4", r"^prog\.s: output 'x': name used "),
    (".word 0x1" + "0" * 64, r"^prog\.s:1: \.word 0x1.* is not a 256-bit unsigned value$"),
    (".bogus 1", r"^prog\.s:1: unknown directive '\.bogus'; directives are \.config"),
    ("SYNC engine=XX", r"^prog\.s:1: SYNC\.engine=XX: expected one of LD, EX, VX, ST"),
]


@pytest.mark.parametrize(("text", "pattern"), ERRORS)
def test_errors_name_line_and_field(text: str, pattern: str) -> None:
    with pytest.raises(AsmError, match=pattern) as info:
        assemble(text, filename="prog.s")
    assert isinstance(info.value, ProgramError)  # callers catching ProgramError see these


def test_error_attributes() -> None:
    with pytest.raises(AsmError) as info:
        assemble("HALT\nFOO", filename="x.s")
    assert (info.value.filename, info.value.line) == ("x.s", 2)
    assert info.value.reason.startswith("unknown instruction 'FOO'")
    with pytest.raises(AsmError, match=r"^<instruction>: empty line$"):
        parse_instruction("   # nothing")
    with pytest.raises(AsmError, match="cannot read assembly"):
        assemble_file("/nonexistent/prog.s")
