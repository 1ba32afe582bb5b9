"""The reference interpreter: timing of tiny programs worked out by hand from the contract,
the semantics of every instruction against plain Python/numpy arithmetic, and the input
plumbing (npu.runtime.io)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npu.builder import ProgramBuilder
from npu.isa import PRESETS, Engine, Opcode, encode_words
from npu.program import Binding, Program, Segment
from npu.runtime.io import initial_state
from npu.runtime.reference import run_reference
from npu.runtime.result import Stall

NPU4 = PRESETS["npu4"]   # rows = cols = 4, dram_latency 32, 4 B per beat, vx_depth 4


def rows(result, *idx: int) -> list[tuple[int, ...]]:
    """(dispatch, ready, start, complete, retire, stall) of the given instructions."""
    t = result.trace
    return [(int(t.dispatch[i]), int(t.ready[i]), int(t.start[i]), int(t.complete[i]),
             int(t.retire[i]), int(t.stall[i])) for i in idx]


def run(b: ProgramBuilder, **kw):
    result = run_reference(b.build(), **kw)
    # Jumping over idle cycles must not change anything.
    slow = run_reference(b.build(), skip_idle=False, **kw)
    assert slow.cycles == result.cycles and slow.trace.equal(result.trace)
    return result


def builder(cfg=NPU4, **changes) -> ProgramBuilder:
    return ProgramBuilder(dataclasses.replace(cfg, **changes) if changes else cfg,
                          dram_bytes=1024)


# --------------------------------------------------------------------------------------------
# Timing, by hand. npu4: LOAD busy = rows * cdiv(row_bytes, 4), latency busy + 32;
# MATMUL busy n, latency n + 8; PRELOAD busy = latency = 4; VECTOR busy n + 3, latency + 4;
# ELTWISE busy n, latency n + 4; SYNC 1/1.
# --------------------------------------------------------------------------------------------

def test_load_alone() -> None:
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=2, row_bytes=4, dram_stride_inner=4)
    r = run(b)
    # d 0, start 1, busy 2, complete 1 + 2 + 32 = 35, retires at once; HALT dispatched at 1.
    assert rows(r, 0) == [(0, 1, 1, 35, 35, Stall.NONE)]
    assert rows(r, 1) == [(1, 1, 1, 2, 2, Stall.NONE)]
    assert r.cycles == 35
    assert list(r.trace.engine) == [Engine.LD, -1]


def test_halt_alone_and_trailing_halt() -> None:
    b = builder()
    b.halt()
    assert run(b).cycles == 1
    b = builder()
    b.sync("LD")                               # s 1, c = r = 2; HALT d 1 -> max(2, 2)
    assert run(b).cycles == 2


def test_back_to_back_matmuls_do_not_drain() -> None:
    b = builder()
    b.matmul(spad_addr=0, n_inner=3, acc_addr=0)
    b.matmul(spad_addr=0, n_inner=5, acc_addr=3)
    r = run(b)
    # First: s 1, array busy until 4, c = 1 + 3 + 8 = 12. Second: ready 2, waits for the
    # array's input only (UNIT) -> s 4, c = 4 + 5 + 8 = 17.
    assert rows(r, 0, 1) == [(0, 1, 1, 12, 12, Stall.NONE), (1, 2, 4, 17, 17, Stall.UNIT)]
    assert r.cycles == 17


def test_preload_beside_matmul_and_bank_rule() -> None:
    b = builder()
    b.preload(0)                                           # 0
    b.matmul(spad_addr=0, n_inner=6, acc_addr=0, swap=1)   # 1
    b.preload(4)                                           # 2
    b.matmul(spad_addr=0, n_inner=2, acc_addr=8, swap=1)   # 3
    b.preload(8)                                           # 4
    r = run(b)
    assert rows(r, 0, 1, 2, 3, 4) == [
        # PRELOAD: s 1, c 5 (writes bank 1).
        (0, 1, 1, 5, 5, Stall.NONE),
        # MATMUL swap waits for the preload's completion: s 5; active = 1; bank 1 busy to 19.
        (1, 2, 5, 19, 19, Stall.PRELOAD),
        # Next PRELOAD (bank 0, free) right after, beside the matmul: s 6, c 10; it retires
        # after the matmul (in order): r 20.
        (2, 6, 6, 10, 20, Stall.NONE),
        # MATMUL swap: preload done at 10, array input free at 11 -> UNIT was last: s 11.
        (3, 7, 11, 21, 21, Stall.UNIT),
        # PRELOAD into bank 1, which matmul 1 uses until 19: BANK.
        (4, 12, 19, 23, 23, Stall.BANK),
    ]
    assert r.cycles == 23


def test_token_wait() -> None:
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="EX")   # c 34, signals at 34
    b.sync("EX", wait="LD")
    r = run(b)
    assert rows(r, 0, 1) == [(0, 1, 1, 34, 34, Stall.NONE), (1, 2, 34, 35, 35, Stall.TOKEN)]
    assert r.cycles == 35


def test_queue_full_stalls_dispatch() -> None:
    b = builder(queue_depth=2)
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="EX")   # 0: c 34
    b.sync("EX", wait="LD")                                           # 1: starts at 34
    for _ in range(3):                                                # 2, 3, 4
        b.sync("EX")
    r = run(b)
    # The EX queue holds 1 and 2 from cycle 2; 3 is dispatched when 1 leaves it (34), 4 when
    # 2 leaves (35), HALT at 36.
    assert list(r.trace.dispatch) == [0, 1, 2, 34, 35, 36]
    assert rows(r, 1, 2, 3, 4) == [(1, 2, 34, 35, 35, Stall.TOKEN),
                                   (2, 35, 35, 36, 36, Stall.NONE),
                                   (34, 36, 36, 37, 37, Stall.NONE),
                                   (35, 37, 37, 38, 38, Stall.NONE)]
    assert r.cycles == 38


def test_in_order_retirement_and_retire_depth() -> None:
    b = builder(retire_depth=2)
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4)   # 0: s 1, c 34
    b.sync("LD")                                         # 1: s 2, c 3, retires after 0
    b.sync("LD")                                         # 2: two in flight -> RETIRE stall
    r = run(b)
    assert rows(r, 0, 1, 2) == [(0, 1, 1, 34, 34, Stall.NONE),
                                (1, 2, 2, 3, 35, Stall.NONE),
                                (2, 3, 34, 35, 36, Stall.RETIRE)]
    assert r.cycles == 36


def test_eltwise_waits_for_previous_vx_instruction() -> None:
    b = builder()
    b.vector(acc_addr=0, spad_addr=8, param_addr=4, n=2)     # s 1, busy 5, c 1 + 5 + 4 = 10
    b.eltwise(a_addr=8, b_addr=9, dst=12, n_inner=1)         # unit free 6, hazard until 10
    r = run(b)
    assert rows(r, 0, 1) == [(0, 1, 1, 10, 10, Stall.NONE), (1, 2, 10, 15, 15, Stall.HAZARD)]


def test_unit_stall_beats_token_when_later() -> None:
    # Token available at 34 (LOAD retires), VX unit busy until 2 + 43 = 45: UNIT is last.
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="VX")
    b.vector(acc_addr=0, spad_addr=0, param_addr=4, n=40)
    b.vector(acc_addr=0, spad_addr=0, param_addr=4, n=1, wait="LD")
    r = run(b)
    assert rows(r, 1, 2) == [(1, 2, 2, 49, 49, Stall.NONE), (2, 3, 45, 53, 53, Stall.UNIT)]


def test_barrier_waits_for_everything() -> None:
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4)   # c = r = 34
    b.barrier()                                          # dispatched at 34
    b.sync("ST")                                         # d 35, s 36, c 37
    r = run(b)
    assert rows(r, 1) == [(34, 34, 34, 35, 35, Stall.NONE)]
    assert rows(r, 2) == [(35, 36, 36, 37, 37, Stall.NONE)]
    assert int(r.trace.dispatch[3]) == 36 and r.cycles == 37


def test_units_of_one_engine_and_engines_overlap() -> None:
    # LD and ST run side by side: a STORE does not wait for an unrelated LOAD.
    b = builder()
    b.load(dram_addr=0, dst=0, n_inner=4, row_bytes=4)               # s 1, c 1 + 4 + 32
    b.store(dram_addr=512, src=8, n_inner=2, row_bytes=3)            # s 2, c 2 + 2 + 32
    r = run(b)
    assert rows(r, 0, 1) == [(0, 1, 1, 37, 37, Stall.NONE), (1, 2, 2, 36, 36, Stall.NONE)]


# --------------------------------------------------------------------------------------------
# Semantics, against independent arithmetic. Memories are filled by LOADs from random DRAM.
# --------------------------------------------------------------------------------------------

def _rne_shift(x: int, s: int) -> int:
    """round(x / 2**s), ties to even, in Python integers."""
    if s == 0:
        return x
    q, r = divmod(x, 1 << s)
    half = 1 << (s - 1)
    return q + (1 if r > half or (r == half and q & 1) else 0)


def _wrap32(x: int) -> int:
    return (x + (1 << 31)) % (1 << 32) - (1 << 31)


def _sat(y: int, lo: int, hi: int) -> int:
    return max(-128, min(127, min(max(y, lo), hi)))


def _random_dram(rng: np.random.Generator, n: int = 1024) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def _builder_with(dram: np.ndarray, cfg=NPU4) -> ProgramBuilder:
    b = ProgramBuilder(cfg, dram_bytes=len(dram) + 512)
    b.segment("data", dram, addr=0)
    return b


def test_load_strided_fill_acc_and_overlap() -> None:
    rng = np.random.default_rng(1)
    dram = _random_dram(rng)
    b = _builder_with(dram)
    b.load(dram_addr=7, dram_stride_inner=9, dram_stride_outer=40, dst=3, dst_stride_outer=5,
           n_inner=3, n_outer=2, row_bytes=3)
    b.load(dram_addr=100, dram_stride_inner=16, dst=20, n_inner=2, row_bytes=16, mem=1)
    b.load(dram_addr=999, dst=30, n_inner=2, n_outer=2, dst_stride_outer=3, row_bytes=2,
           fill=1, fill_value=-5)
    b.load(dram_addr=200, dram_stride_inner=4, dram_stride_outer=100, dst=40,
           dst_stride_outer=1, n_inner=2, n_outer=2, row_bytes=4)      # runs overlap on row 41
    r = run_reference(b.build())
    spad = r.spad.view(np.uint8)
    for o in range(2):
        for i in range(3):
            src = 7 + o * 40 + i * 9
            assert list(spad[3 + o * 5 + i]) == list(dram[src:src + 3]) + [0]
    acc_bytes = r.acc.view(np.uint8)
    assert np.array_equal(acc_bytes[20], dram[100:116]) and np.array_equal(acc_bytes[21],
                                                                           dram[116:132])
    assert r.acc[20, 0] == int.from_bytes(dram[100:104].tobytes(), "little", signed=True)
    for row in (30, 31, 33, 34):
        assert list(r.spad[row]) == [-5, -5, 0, 0]
    assert list(spad[40]) == list(dram[200:204])
    assert list(spad[41]) == list(dram[300:304])     # the later run wins
    assert list(spad[42]) == list(dram[304:308])


def test_gather_rows_by_index() -> None:
    rng = np.random.default_rng(2)
    dram = _random_dram(rng)
    idx = np.array([5, 0, 5, 12], dtype="<i4")
    dram[900:916] = idx.view(np.uint8)
    b = _builder_with(dram)
    b.gather(dram_addr=64, index_addr=900, row_stride=20, dst=10, n=4, row_bytes=3)
    b.gather(dram_addr=0, index_addr=904, row_stride=16, dst=2, n=2, row_bytes=12, mem=1,
             signal="ST")
    r = run_reference(b.build())
    spad = r.spad.view(np.uint8)
    for k, i in enumerate(idx):
        assert list(spad[10 + k]) == list(dram[64 + 20 * i:64 + 20 * i + 3]) + [0]
    acc = r.acc.view(np.uint8)
    assert list(acc[2]) == list(dram[0:12]) + [0] * 4            # index 0
    assert list(acc[3]) == list(dram[80:92]) + [0] * 4           # index 5


def test_preload_matmul_swap_accumulate_and_wrap() -> None:
    rng = np.random.default_rng(3)
    dram = _random_dram(rng)
    b = _builder_with(dram)
    b.load(dram_addr=0, dram_stride_inner=4, dst=0, n_inner=40, row_bytes=4, signal="EX")
    b.preload(0, wait="LD")                         # bank 1 <- rows 0..3
    b.preload(4)                                    # bank 1 <- rows 4..7 (no swap between)
    b.matmul(spad_addr=10, spad_stride_inner=2, spad_stride_outer=7, n_inner=3, n_outer=2,
             acc_addr=1, swap=1)                    # uses rows 4..7
    b.preload(20)                                   # bank 0 <- rows 20..23
    b.matmul(spad_addr=30, n_inner=6, acc_addr=1, accumulate=1, swap=1)
    b.matmul(spad_addr=30, n_inner=2, acc_addr=9, swap=0)     # same bank again
    r = run_reference(b.build())
    sp = dram[:160].view(np.int8).reshape(40, 4).astype(np.int64)
    w1, w0 = sp[4:8], sp[20:24]
    x1 = sp[[10 + o * 7 + i * 2 for o in range(2) for i in range(3)]]
    expect = x1 @ w1 + sp[30:36] @ w0
    assert np.array_equal(r.acc[1:7].astype(np.int64), expect)
    assert np.array_equal(r.acc[9:11].astype(np.int64), sp[30:32] @ w0)
    assert not r.acc[0].any() and not r.acc[7:9].any()
    # int32 wrap-around when accumulating: ACC lanes at 2**31 - 1 plus 4 * 127 * 127.
    data = np.concatenate([np.tile(np.array([0xFF, 0xFF, 0xFF, 0x7F], np.uint8), 4),
                           np.full(16, 0x7F, dtype=np.uint8)])
    b = _builder_with(data)
    b.load(dram_addr=16, dram_stride_inner=4, dst=0, n_inner=4, row_bytes=4, signal="EX")
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=16, mem=1, signal="EX")
    b.preload(0, wait="LD")
    b.matmul(spad_addr=0, n_inner=1, acc_addr=0, accumulate=1, swap=1, wait="LD")
    r = run_reference(b.build())
    assert list(r.acc[0]) == [_wrap32((1 << 31) - 1 + 4 * 127 * 127)] * 4
    assert r.acc[0, 0] < 0


def test_vector_requantizes_per_lane() -> None:
    rng = np.random.default_rng(4)
    acc_vals = rng.integers(-(1 << 31), 1 << 31, (5, 4)).astype("<i4")
    acc_vals[0] = [(1 << 31) - 1, -(1 << 31), 0, 5]           # bias wraps
    params = np.stack([rng.integers(-1000, 1000, 4), rng.integers(1 << 29, 1 << 31, 4),
                       np.array([0, 31, 40, 67])]).astype("<i4")   # shift 67 & 63 = 3
    dram = np.concatenate([acc_vals.view(np.uint8).ravel(), params.view(np.uint8).ravel()])
    b = _builder_with(dram)
    b.load(dram_addr=0, dram_stride_inner=16, dst=0, n_inner=5, row_bytes=16, mem=1)
    b.load(dram_addr=80, dram_stride_inner=16, dst=8, n_inner=3, row_bytes=16, mem=1,
           signal="VX")
    b.vector(acc_addr=0, spad_addr=3, param_addr=8, n=5, zero_point=-7, clamp_min=-100,
             clamp_max=90, wait="LD")
    r = run_reference(b.build())
    bias, mult, shift = (params[k].astype(int) for k in range(3))
    for i in range(5):
        for lane in range(4):
            x = _wrap32(int(acc_vals[i, lane]) + int(bias[lane])) * int(mult[lane])
            y = _rne_shift(x, int(shift[lane]) & 63) - 7
            assert r.spad[3 + i, lane] == _sat(y, -100, 90), (i, lane)


def test_eltwise_add_and_max_with_strides_and_in_place() -> None:
    rng = np.random.default_rng(5)
    dram = _random_dram(rng, 256)
    b = _builder_with(dram)
    b.load(dram_addr=0, dram_stride_inner=4, dst=0, n_inner=48, row_bytes=4, signal="VX")
    b.eltwise(func=0, a_addr=0, a_stride_inner=2, a_stride_outer=5, b_addr=20, n_inner=3,
              n_outer=2, b_stride_outer=3, dst=40, a_zero=3, b_zero=-4, a_mult=5_000_001,
              b_mult=(1 << 23) - 1, shift=26, zero_point=2, clamp_min=-60, clamp_max=100, wait="LD")
    b.eltwise(func=1, a_addr=30, b_addr=33, n_inner=3, dst=30, clamp_min=-10, clamp_max=127)
    r = run_reference(b.build())
    sp = dram[:192].view(np.int8).reshape(48, 4).astype(int)
    k = 0
    for o in range(2):
        for i in range(3):
            a, bb = sp[o * 5 + i * 2], sp[20 + o * 3 + i]
            for lane in range(4):
                t = (a[lane] - 3) * 5_000_001 + (bb[lane] + 4) * ((1 << 23) - 1)
                assert r.spad[40 + k, lane] == _sat(_rne_shift(t, 26) + 2, -60, 100)
            k += 1
    for i in range(3):       # in place: dst coincides with A
        assert list(r.spad[30 + i]) == [_sat(max(x, y), -10, 127)
                                        for x, y in zip(sp[30 + i], sp[33 + i])]


def test_store_strided_from_spad_and_acc() -> None:
    rng = np.random.default_rng(6)
    dram = _random_dram(rng, 512)
    b = _builder_with(dram)
    b.load(dram_addr=0, dram_stride_inner=4, dst=0, n_inner=16, row_bytes=4, signal="ST")
    b.load(dram_addr=64, dram_stride_inner=16, dst=0, n_inner=2, row_bytes=16, mem=1,
           signal="ST")
    b.store(dram_addr=600, dram_stride_inner=10, dram_stride_outer=3, src=1,
            src_stride_outer=4, n_inner=2, n_outer=3, row_bytes=3, wait="LD")
    b.store(dram_addr=800, dram_stride_inner=16, src=0, n_inner=2, row_bytes=13, mem=1,
            wait="LD")
    r = run_reference(b.build())
    out = r.dram.copy()
    expect = np.zeros(1024, dtype=np.uint8)
    expect[:512] = dram
    for o in range(3):        # outer runs overlap in DRAM: (o, i) order, the later wins
        for i in range(2):
            dst = 600 + o * 3 + i * 10
            row = 1 + o * 4 + i
            expect[dst:dst + 3] = dram[4 * row:4 * row + 3]
    expect[800:813] = dram[64:77]
    expect[816:829] = dram[80:93]
    assert np.array_equal(out, expect)


# --------------------------------------------------------------------------------------------
# Inputs and outputs
# --------------------------------------------------------------------------------------------

def _io_program() -> Program:
    b = ProgramBuilder(NPU4)
    b.input("a", (2, 3), "int8")
    b.input("w", (3,), "int32")
    b.input("f", (2,), "float32")
    b.output("o", (4,), "uint8")
    return b.build()


def test_initial_state_writes_inputs_little_endian() -> None:
    prog = _io_program()
    a = np.array([[1, -2, 3], [-128, 127, 0]])
    w = np.array([1, -1, 1 << 20])
    dram, spad, acc = initial_state(prog, {"a": a, "w": w, "f": np.array([0.5, -2.0])})
    ba, bw, bf = prog.inputs
    assert list(dram[ba.addr:ba.addr + 6].view(np.int8)) == [1, -2, 3, -128, 127, 0]
    assert list(dram[bw.addr:bw.addr + 12].view("<i4")) == [1, -1, 1 << 20]
    assert list(dram[bf.addr:bf.addr + 8].view("<f4")) == [0.5, -2.0]
    assert spad.shape == (NPU4.spad_rows, 4) and spad.dtype == np.int8 and not spad.any()
    assert acc.shape == (NPU4.acc_rows, 4) and acc.dtype == np.int32 and not acc.any()


@pytest.mark.parametrize(("inputs", "message"), [
    ({"a": np.zeros((3, 2)), "w": np.zeros(3), "f": np.zeros(2)}, "shape"),
    ({"a": np.full((2, 3), 128), "w": np.zeros(3), "f": np.zeros(2)}, "range"),
    ({"a": np.full((2, 3), 0.5), "w": np.zeros(3), "f": np.zeros(2)}, "non-integral"),
    ({"a": np.zeros((2, 3)), "w": np.zeros(3)}, "'f' .* was not given"),
    ({"a": np.zeros((2, 3)), "w": np.zeros(3), "f": np.zeros(2), "z": 1}, "unknown input"),
    ({"a": np.array([["x"] * 3] * 2), "w": np.zeros(3), "f": np.zeros(2)}, "numeric"),
])
def test_initial_state_rejects_bad_inputs(inputs, message) -> None:
    with pytest.raises(ValueError, match=message):
        initial_state(_io_program(), inputs)


def test_missing_input_is_fine_when_a_segment_initialises_it() -> None:
    words = encode_words([])
    seg = Segment("x", 8, bytes(range(1, 9)))
    prog = Program(NPU4, words.reshape(0, 4), 64, [seg], [Binding("x", 8, (8,), "int8")])
    dram, _, _ = initial_state(prog, None)
    assert list(dram[8:16]) == list(range(1, 9))
    prog.inputs = [Binding("x", 12, (8,), "int8")]       # half covered: must be given
    with pytest.raises(ValueError, match="not given"):
        initial_state(prog, None)


def test_outputs_are_read_back() -> None:
    b = ProgramBuilder(NPU4)
    x = b.input("x", (4, 4), "int8")
    y = b.output("y", (2, 4), "int8")
    b.load(dram_addr=x.addr, dram_stride_inner=4, dst=0, n_inner=4, row_bytes=4, signal="ST")
    b.store(dram_addr=y.addr, dram_stride_inner=4, src=2, n_inner=2, row_bytes=4, wait="LD")
    xs = np.arange(16).reshape(4, 4) - 8
    r = run_reference(b.build(), {"x": xs})
    assert np.array_equal(r.outputs()["y"], xs[2:])
    assert r.extra["executor"] == "reference"
    assert r.program.instructions.shape == (3, 4)
    assert [i.opcode for i in r.program.decoded()] == [Opcode.LOAD, Opcode.STORE, Opcode.HALT]


def test_bad_watchdog_argument() -> None:
    b = builder()
    with pytest.raises(ValueError, match="watchdog"):
        run_reference(b.build(), watchdog=0)
