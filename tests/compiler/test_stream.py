"""The instruction stream: hazards from footprints, tokens from vector clocks, encoding."""

from __future__ import annotations

import numpy as np
import pytest

from npu import numerics
from npu.compiler.errors import CompileError
from npu.compiler.stream import Stream
from npu.isa import Engine, Opcode, decode_words, encode_words, get_config
from npu.program import Binding, Program, Segment

LD, EX, VX, ST = (1 << int(e) for e in Engine)


def _gemm_stream(cfg, tiles: int = 2, rows: int = 8):
    """x[rows, 16*tiles] @ w[16*tiles, 16] -> requantized int8, as the emitters do it."""
    r = cfg.rows
    s = Stream(cfg, dram_bytes=4096, const_end=2048)
    w_dram, par_dram, x_dram, y_dram = 0, 1024, 2048, 3072
    s.load(dram_addr=w_dram, n_inner=r * tiles, dram_stride_inner=r, row_bytes=r, dst=64)
    s.load(dram_addr=par_dram, n_inner=3, dram_stride_inner=4 * r, row_bytes=4 * r, dst=32,
           mem=1)
    for t in range(tiles):
        s.load(dram_addr=x_dram + t * r, n_inner=rows, dram_stride_inner=r * tiles,
               row_bytes=r, dst=t * 16)
    for t in range(tiles):
        s.preload(64 + t * r)
        s.matmul(spad_addr=t * 16, acc_addr=0, n_inner=rows, accumulate=int(t > 0), swap=1)
    s.vector(acc_addr=0, spad_addr=200, param_addr=32, n=rows, zero_point=0)
    s.store(src=200, n_inner=rows, row_bytes=r, dram_addr=y_dram, dram_stride_inner=r)
    s.halt()
    return s, (w_dram, par_dram, x_dram, y_dram)


def test_tokens_follow_dataflow_and_cover_transitively() -> None:
    cfg = get_config("npu16")
    s, _ = _gemm_stream(cfg)
    s.assign_tokens()
    ops = [(s.opcodes[i], s.wait[i], s.signal[i]) for i in range(len(s))]
    loads = [i for i, (op, _, _) in enumerate(ops) if op == Opcode.LOAD]
    # The first PRELOAD waits for the weights; the first MATMUL for its input rows.
    first_pre = next(i for i, (op, _, _) in enumerate(ops) if op == Opcode.PRELOAD)
    assert ops[first_pre][1] == LD
    # The VECTOR waits on EX and, for its parameter rows, is covered or waits on LD.
    vec = next(i for i, (op, _, _) in enumerate(ops) if op == Opcode.VECTOR)
    assert ops[vec][1] & EX
    st = next(i for i, (op, _, _) in enumerate(ops) if op == Opcode.STORE)
    assert ops[st][1] == VX
    # Every signal pairs with exactly one wait on the same counter, in order.
    for src in range(4):
        for dst in range(4):
            sig = [i for i in range(len(s)) if s.signal[i] >> dst & 1 and
                   s.engines[i] == src]
            wai = [i for i in range(len(s)) if s.wait[i] >> src & 1 and s.engines[i] == dst]
            assert len(sig) == len(wai)
            assert all(a < b for a, b in zip(sig, wai))
    assert s.wait[loads[0]] == 0 and all(s.signal[i] == 0 for i in range(len(s))
                                         if s.opcodes[i] == Opcode.STORE)


def test_write_after_read_waits_for_the_reader() -> None:
    cfg = get_config("npu16")
    s = Stream(cfg, dram_bytes=1024)
    s.load(dram_addr=0, n_inner=16, dram_stride_inner=16, row_bytes=16, dst=0)
    pre = s.preload(0)
    again = s.load(dram_addr=256, n_inner=16, dram_stride_inner=16, row_bytes=16, dst=0)
    s.halt()
    s.assign_tokens()
    assert s.wait[pre] == LD and s.signal[pre] == LD and s.wait[again] == EX


def test_program_runs_and_computes(tmp_path) -> None:
    from npu.runtime.engine import run

    cfg = get_config("npu16")
    s, (w_dram, par_dram, x_dram, y_dram) = _gemm_stream(cfg)
    s.assign_tokens()
    words = s.encode()
    rng = np.random.default_rng(0)
    w = rng.integers(-20, 20, (32, 16), dtype=np.int8)
    x = rng.integers(-20, 20, (8, 32), dtype=np.int8)
    par = np.zeros((3, 16), np.int32)
    par[1] = 1 << 30
    par[2] = 36                        # y = round(acc / 64)
    segs = [Segment("w", w_dram, w.tobytes()), Segment("par", par_dram, par.tobytes())]
    prog = Program(cfg, words, 4096, segs, [Binding("x", x_dram, (8, 32))],
                   [Binding("y", y_dram, (8, 16))])
    prog.validate()
    res = run(prog, {"x": x}, engine="reference")
    want = numerics.requantize(numerics.matmul(x, w), 0, 1 << 30, 36, 0, -128, 127)
    np.testing.assert_array_equal(res.outputs()["y"], want)


def test_encode_matches_isa_encoder() -> None:
    cfg = get_config("npu16")
    s, _ = _gemm_stream(cfg)
    s.assign_tokens()
    words = s.encode()
    instrs = decode_words(words)
    np.testing.assert_array_equal(encode_words(instrs), words)
    assert [int(i.opcode) for i in instrs] == s.opcodes


def test_out_of_range_field_is_an_internal_error() -> None:
    s = Stream(get_config("npu16"), dram_bytes=64)
    s.vector(acc_addr=0, spad_addr=0, param_addr=0, n=1 << 17, zero_point=0)
    s.halt()
    s.assign_tokens()
    with pytest.raises(CompileError, match="field n="):
        s.encode()


def test_store_into_constants_is_refused() -> None:
    s = Stream(get_config("npu16"), dram_bytes=4096, const_end=1024)
    with pytest.raises(CompileError, match="constants"):
        s.store(src=0, n_inner=1, row_bytes=16, dram_addr=0, dram_stride_inner=16)
