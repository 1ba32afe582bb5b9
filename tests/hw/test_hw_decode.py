"""The RTL decoders against npu.isa: field layouts, legality (isa.decode), static address checks
(isa.address_error) and the timing formulas (isa.timing), on random instructions and words."""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Shape
from hwsim import comb_eval, random_instr, small_config, word_of

from npu import isa
from npu.hw.control import ENGINE_OPS, DispatchDecoder, HeadDecoder
from npu.hw.decode import INSTR_LAYOUTS
from npu.isa import Engine, ISAError, Opcode, address_error, decode, timing


def test_layouts_are_generated_from_the_isa() -> None:
    for op, fields in isa.LAYOUTS.items():
        layout = INSTR_LAYOUTS[op]
        assert layout.size == isa.INSTR_BITS
        assert {name for name, _ in layout} == set(fields)
        for name, f in fields.items():
            hw = layout[name]
            shape = Shape.cast(hw.shape)
            assert (hw.offset, shape.width, shape.signed) == (f.lsb, f.width, f.signed), name


def _words(rng: np.random.Generator, cfg: isa.NPUConfig, n: int) -> list[int]:
    """Legal instructions (about half with bad addresses), and corrupted words."""
    out = []
    for _ in range(n):
        w = word_of(random_instr(rng, cfg))
        r = rng.random()
        if r < 0.15:
            w ^= 1 << int(rng.integers(12, 256))               # maybe a reserved bit
        elif r < 0.2:
            w = (w & ~0xF) | int(rng.choice([0, 11, 12, 15]))   # illegal opcode
        elif r < 0.3:
            w |= int(rng.integers(0, 256)) << 4                 # tokens naming any engine
        out.append(w)
    return out


def test_dispatch_decoder_matches_decode_and_address_error() -> None:
    cfg = small_config()
    rng = np.random.default_rng(1)
    dram_bytes = 512
    dut = DispatchDecoder(cfg)
    words = _words(rng, cfg, 1500)
    cases = [[(dut.word, w), (dut.pc, 3), (dut.n_instr, 4), (dut.dram_bytes, dram_bytes)]
             for w in words]
    got = comb_eval(dut, cases, [dut.legal, dut.address_ok, dut.engine, dut.halt, dut.barrier])
    kinds = {"illegal": 0, "bad_address": 0, "ok": 0}
    for w, (legal, addr_ok, engine, halt, barrier) in zip(words, got):
        try:
            ins = decode(w.to_bytes(32, "little"))
        except ISAError:
            assert legal == 0, hex(w)
            kinds["illegal"] += 1
            continue
        assert legal == 1, ins
        why = address_error(ins, cfg, dram_bytes)
        assert addr_ok == (why is None), (ins, why)
        kinds["bad_address" if why else "ok"] += 1
        assert halt == (ins.opcode == Opcode.HALT) and barrier == (ins.opcode == Opcode.BARRIER)
        if ins.engine is not None:
            assert engine == ins.engine
    assert min(kinds.values()) > 100, kinds   # every verdict is exercised


def test_dispatch_decoder_faults_past_the_end() -> None:
    cfg = small_config()
    dut = DispatchDecoder(cfg)
    halt = word_of(isa.Instr(Opcode.HALT))
    got = comb_eval(dut, [[(dut.word, halt), (dut.pc, pc), (dut.n_instr, 3)] for pc in (2, 3)],
                    [dut.legal])
    assert got == [[1], [0]]


def test_head_decoders_evaluate_the_timing_formulas() -> None:
    cfg = small_config()
    rng = np.random.default_rng(2)
    for e in Engine:
        dut = HeadDecoder(cfg, e)
        ops = ENGINE_OPS[e] + [Opcode.SYNC]
        instrs = []
        for _ in range(150):
            ins = random_instr(rng, cfg, ops)
            if ins.opcode == Opcode.SYNC:
                ins = isa.Instr(Opcode.SYNC, 0, 0, {"engine": int(e)})
            instrs.append(ins)
        got = comb_eval(dut, [[(dut.word, word_of(i))] for i in instrs],
                        [dut.busy, dut.latency, dut.unit, dut.wait, dut.signal])
        for ins, (busy, lat, unit, wait, signal) in zip(instrs, got):
            tm = timing(ins, cfg)
            assert (busy, lat, unit) == (tm.busy, tm.latency, int(tm.unit)), ins
            assert (wait, signal) == (ins.wait, ins.signal)
