"""The profiler: figures checked against hand-computed values and a cycle-by-cycle oracle.

The hand program's schedule below was worked out by hand from the timing contract
(docs/architecture.md) and is also checked against the reference interpreter, so the expected
profile figures rest on an independent derivation, not on the profiler's own arithmetic.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from npu.builder import ProgramBuilder
from npu.isa import Engine, Opcode, Unit, timing
from npu.program import Program
from npu.runtime.profile import DISPATCHER, UNLABELLED, Profile
from npu.runtime.result import RunResult, Stall, Trace


def hand_program() -> Program:
    """npu4 (4x4 PEs, 4-byte beats, DRAM latency 32): load, matmul, requantize, store, gather."""
    b = ProgramBuilder("npu4", dram_bytes=256)
    b.region("load")
    b.load(dram_addr=0, dst=0, n_inner=8, row_bytes=4, dram_stride_inner=4, signal="EX")  # 0
    b.load(dst=8, n_inner=4, row_bytes=4, fill=1, signal="EX")                            # 1
    b.region("mm")
    b.preload(8, wait="LD")                                                               # 2
    b.matmul(spad_addr=0, n_inner=8, acc_addr=0, swap=1, wait="LD", signal="VX")          # 3
    b.vector(acc_addr=0, spad_addr=16, param_addr=8, n=8, wait="EX", signal="ST")         # 4
    b.region("out")
    b.store(src=16, n_inner=8, row_bytes=4, dram_addr=64, dram_stride_inner=4, wait="VX")  # 5
    b.gather(dram_addr=0, index_addr=128, row_stride=4, dst=32, n=2, row_bytes=4)         # 6
    b.halt()                                                                              # 7
    return b.build()


# Worked out by hand: LD starts LOAD 0 at 1 (busy 8), LOAD 1 waits for the DMA until 9 (busy 4),
# GATHER until 13 (busy 2 + 32 + 2 = 36). PRELOAD waits for LOAD 0's token (retire 41);
# MATMUL is ready at 42 but needs LOAD 1's token (retire 45) and the preload's completion (45):
# both at 45, the tie goes to TOKEN. VECTOR waits for MATMUL's retirement (45 + 8 + 8 = 61),
# STORE for VECTOR's (61 + 11 + 4 = 76). HALT is dispatched at 7 (s = d, r = d + 1).
HAND = {
    "dispatch": [0, 1, 2, 3, 4, 5, 6, 7],
    "ready": [1, 2, 3, 42, 5, 6, 10, 7],
    "start": [1, 9, 41, 45, 61, 76, 13, 7],
    "complete": [41, 45, 45, 61, 76, 116, 81, 8],
    "retire": [41, 45, 45, 61, 76, 116, 81, 8],
    "stall": [0, Stall.UNIT, Stall.TOKEN, Stall.TOKEN, Stall.TOKEN, Stall.TOKEN, Stall.UNIT, 0],
    "engine": [0, 0, 1, 1, 2, 3, 0, -1],
}
HAND_CYCLES = 116


def hand_result() -> RunResult:
    p = hand_program()
    trace = Trace(**{k: np.array([int(x) for x in v], dtype=np.int64) for k, v in HAND.items()})
    return RunResult(p, HAND_CYCLES, p.initial_dram(), np.zeros((1, 4), np.int8),
                     np.zeros((1, 4), np.int32), trace)


@pytest.fixture
def prof() -> Profile:
    return Profile.from_result(hand_result(), name="hand")


def test_hand_schedule_is_the_contracts():
    """The hand-derived trace is what the reference interpreter produces."""
    ref = pytest.importorskip("npu.runtime.reference")
    r = ref.run_reference(hand_program())
    assert r.cycles == HAND_CYCLES
    assert r.trace.equal(hand_result().trace)


def test_totals(prof):
    assert prof.cycles == 116
    assert prof.macs == 8 * 4 * 4                       # MATMUL: 8 rows x 16 PEs
    assert prof.dram_read == 8 * 4 + 2 * (4 + 4)        # LOAD rows + GATHER rows and indices
    assert prof.dram_write == 8 * 4                     # the fill LOAD reads nothing
    assert prof.utilization == pytest.approx(128 / (116 * 16))
    assert prof.read_bandwidth_utilization == pytest.approx(48 / (116 * 4))
    assert prof.write_bandwidth_utilization == pytest.approx(32 / (116 * 4))
    t = prof.total
    assert t.ideal_cycles == 8.0
    assert t.intensity == pytest.approx(128 / 80)
    assert t.memory_cycles == 12.0                      # 48 bytes on the read channel / 4
    assert t.bound == "memory"


def test_instruction_columns(prof):
    c = prof.instructions
    assert c["stall_cycles"].tolist() == [0, 7, 38, 3, 56, 70, 3, 0]
    assert c["end"].tolist() == HAND["retire"]
    assert c["busy"].tolist() == [8, 4, 4, 8, 11, 8, 36, 1]
    assert c["region"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert c["macs"].tolist() == [0, 0, 0, 128, 0, 0, 0, 0]
    row = prof.instruction(3)
    assert (row["opcode"], row["engine"], row["unit"], row["region"]) == \
        ("MATMUL", "EX", "EX_ARRAY", "mm")
    assert (row["start"], row["end"], row["stall_cycles"], row["stall_reason"]) == \
        (45, 61, 3, "TOKEN")
    assert prof.instruction(7)["engine"] == DISPATCHER


def test_engines(prof):
    ld, ex, vx, st, disp = (prof.engine(n) for n in ("LD", "EX", "VX", "ST", DISPATCHER))
    # LD: [1,9) [9,13) [13,49) busy; its UNIT stalls lie under busy time, so nothing is lost.
    assert (ld.instructions, ld.busy, ld.stalled, ld.idle) == (3, 48, 0, 68)
    # EX: PRELOAD [41,45) and MATMUL [45,53); MATMUL's wait [42,45) is under PRELOAD's busy.
    assert (ex.busy, ex.stalled, ex.idle) == (12, 38, 66)
    assert ex.stalled_by_reason["TOKEN"] == 38 and sum(ex.stalled_by_reason.values()) == 38
    assert (vx.busy, vx.stalled, vx.idle) == (11, 56, 49)
    assert (st.busy, st.stalled, st.idle) == (8, 70, 38)
    assert (disp.instructions, disp.busy, disp.stalled, disp.idle) == (8, 8, 0, 108)


def test_regions(prof):
    load, mm, out = prof.regions
    assert [r.label for r in prof.regions] == ["load", "mm", "out"]
    assert (load.first, load.last, load.start, load.end, load.span) == (0, 1, 1, 45, 44)
    assert (load.dram_read, load.dram_write, load.bound) == (32, 0, "memory")
    assert (mm.start, mm.end, mm.span, mm.macs, mm.ideal_cycles) == (41, 76, 35, 128, 8.0)
    assert (mm.intensity, mm.bound) == (None, "compute")
    # out: the GATHER starts at 13, the STORE retires at 116; HALT does not count.
    assert (out.start, out.end, out.span, out.instructions) == (13, 116, 103, 3)
    assert (out.dram_read, out.dram_write, out.memory_cycles, out.bound) == (16, 32, 8.0, "memory")
    # Shares of the total: up to each region's end (45, 76, then the program's end 116).
    assert [r.cycles for r in prof.regions] == [45, 31, 40]
    assert mm.utilization == pytest.approx(128 / (31 * 16))


def test_region_shares_with_overlap_and_shadow():
    """A region that ends before an earlier one costs nothing; shares always sum to the total."""
    b = ProgramBuilder("npu4", dram_bytes=64)
    b.region("long")
    b.load(dst=0, n_inner=40, row_bytes=4, fill=1)              # LD: [1, 41), ends 73
    b.region("short")
    b.preload(0)                                                # EX: ends early, in the shadow
    b.region("last")
    b.load(dst=40, n_inner=1, row_bytes=4, fill=1)
    p = b.build()
    ref = pytest.importorskip("npu.runtime.reference")
    result = ref.run_reference(p)
    prof = Profile.from_result(result)
    long, short, last = prof.regions
    assert short.end < long.end and short.cycles == 0 and short.span == 4
    assert long.cycles == long.end and last.cycles == result.cycles - long.end
    assert sum(r.cycles for r in prof.regions) == result.cycles


def test_unlabelled_prefix_and_no_regions():
    b = ProgramBuilder("npu4", dram_bytes=64)
    b.load(dst=0, n_inner=1, row_bytes=4, fill=1)
    b.region("tail")
    b.load(dst=1, n_inner=1, row_bytes=4, fill=1)
    p = b.build()
    n = p.n_instructions
    trace = Trace(np.arange(n), np.arange(n) + 1, np.array([1, 2, 2]), np.array([2, 3, 3]),
                  np.array([2, 3, 3]), np.zeros(n, np.int64), np.array([0, 0, -1]))
    prof = Profile.from_result(RunResult(p, 3, p.initial_dram(), None, None, trace))
    assert [r.label for r in prof.regions] == [UNLABELLED, "tail"]
    assert [r.instructions for r in prof.regions] == [1, 2]
    assert prof.regions[0].bound == "-"                 # no MACs, no DRAM traffic


def test_table(prof):
    text = prof.table()
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["mm"][1:10] == ["3", "41", "76", "35", "31", "128", "8", "25.8%", "0"]
    assert rows["total"][5:6] == ["116"] and rows["total"][-1] == "memory"
    assert rows["EX"][1:6] == ["2", "12", "38", "66", "10.3%"]
    assert "longest stalls" in text and "STORE" in text
    widths = {len(line) for line in text.splitlines()[4:9]}
    assert len(widths) == 1, "region table columns are aligned"


def test_json_round_trip(prof, tmp_path):
    path = tmp_path / "p.json"
    text = prof.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    assert data["totals"]["macs"] == 128 and data["totals"]["cycles"] == 116
    assert data["instructions"]["opcode"][3] == "MATMUL"
    assert data["instructions"]["stall_reason"][3] == "TOKEN"
    back = Profile.from_json(path)
    assert back.to_dict() == prof.to_dict()
    assert back.engine("EX").stalled == 38 and back.regions[1].macs == 128
    assert "instructions" not in prof.to_dict(instructions=False)
    with pytest.raises(ValueError, match="instruction columns"):
        Profile.from_dict(prof.to_dict(instructions=False))


def _threads(trace: dict) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def test_perfetto(prof, tmp_path):
    path = tmp_path / "trace.json"
    prof.write_perfetto(path)
    trace = json.loads(path.read_text())
    assert trace == prof.to_perfetto()
    events = trace["traceEvents"]
    threads = _threads(trace)
    names = set(threads.values())
    assert {"dispatcher", "LD", "EX weights (PRELOAD)", "EX array (MATMUL)", "VX", "ST"} <= names
    assert {"LD stalls", "EX stalls", "VX stalls", "ST stalls"} <= names
    process = [e for e in events if e["ph"] == "M" and e["name"] == "process_name"]
    assert len(process) == 1 and "npu4" in process[0]["args"]["name"]
    unit_thread = {Unit.LD_DMA: "LD", Unit.EX_WEIGHTS: "EX weights (PRELOAD)",
                   Unit.EX_ARRAY: "EX array (MATMUL)", Unit.VX: "VX", Unit.ST_DMA: "ST"}
    program = hand_program()
    instrs = [e for e in events if e.get("cat") == "instruction"]
    assert sorted(e["args"]["index"] for e in instrs) == list(range(program.n_instructions))
    for e in instrs:
        i = e["args"]["index"]
        ins = program.decoded()[i]
        t = timing(ins, program.config)
        assert e["name"] == ins.opcode.name
        assert e["ts"] == HAND["start"][i] if ins.engine is not None else HAND["dispatch"][i]
        assert e["dur"] == t.busy
        if ins.engine is not None:
            assert threads[e["tid"]] == unit_thread[t.unit]
        else:
            assert threads[e["tid"]] == "dispatcher"
        for k in ("dispatch", "ready", "start", "complete"):
            assert e["args"][k] == HAND[k][i]
        assert e["args"]["end"] == HAND["retire"][i]
        assert e["args"]["stall_reason"] == Stall(HAND["stall"][i]).name
        assert e["args"]["fields"]["wait"] == "|".join(x.name for x in Engine
                                                       if ins.wait >> x & 1)
    mm = next(e for e in instrs if e["name"] == "MATMUL")
    assert mm["args"]["fields"]["n_inner"] == 8 and mm["args"]["fields"]["swap"] == 1
    stalls = [e for e in events if e.get("cat") == "stall"]
    assert len(stalls) == 6
    for e in stalls:
        i = e["args"]["index"]
        assert (e["ts"], e["dur"]) == (HAND["ready"][i], HAND["start"][i] - HAND["ready"][i])
        assert e["name"] == f"stall {Stall(HAND['stall'][i]).name}"
        assert threads[e["tid"]] == f"{Engine(HAND['engine'][i]).name} stalls"
    regions = {e["name"]: e for e in events if e.get("cat") == "region"}
    assert (regions["mm"]["ts"], regions["mm"]["dur"]) == (41, 35)
    assert regions["mm"]["args"]["cycles"] == 31
    # Slices on one thread never overlap partially (Perfetto needs proper nesting).
    by_tid: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        if e["ph"] == "X":
            by_tid.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_tid.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _colour_pixels(image: np.ndarray, colour: str) -> int:
    from matplotlib.colors import to_rgb
    rgb = np.asarray(to_rgb(colour))
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum())


def test_plot(prof, tmp_path):
    from matplotlib.image import imread
    path = tmp_path / "p.png"
    prof.plot(path)
    assert _png_size(path.read_bytes()) == (1600, 992)
    image = imread(path)
    timeline = image[: image.shape[0] * 45 // 100]
    # Every opcode that ran has a bar far larger than its legend patch; ELTWISE never ran.
    from npu.runtime.profile import _opcode_colours
    colours = _opcode_colours()
    for op in (Opcode.LOAD, Opcode.PRELOAD, Opcode.MATMUL, Opcode.VECTOR, Opcode.STORE):
        assert _colour_pixels(timeline, colours[op]) > 1000, op.name
    assert _colour_pixels(timeline, colours[Opcode.ELTWISE]) == 0


def _oracle(result: RunResult) -> dict[str, tuple[int, int, int]]:
    """busy/stalled/idle per engine, counted cycle by cycle from the definitions."""
    prog, tr = result.program, result.trace
    out = {}
    for e in Engine:
        busy = np.zeros(result.cycles, dtype=bool)
        waiting = np.zeros(result.cycles, dtype=bool)
        for i, ins in enumerate(prog.decoded()):
            if ins.engine != e or tr.start[i] < 0:
                continue
            t = timing(ins, prog.config)
            if t.unit != Unit.NONE:
                busy[tr.start[i]:tr.start[i] + t.busy] = True
            waiting[tr.ready[i]:tr.start[i]] = True
        stalled = waiting & ~busy
        out[e.name] = (int(busy.sum()), int(stalled.sum()),
                       int(result.cycles - busy.sum() - stalled.sum()))
    return out


def _tiled_program() -> Program:
    """Two-bank matmuls whose PRELOADs overlap MATMULs, a BARRIER, a full LD queue and a SYNC."""
    b = ProgramBuilder("npu4", dram_bytes=4096)
    b.region("loads")
    for k in range(14):                                  # overflows the LD queue (8)
        b.load(dram_addr=64 * k, dst=8 * k, n_inner=8, row_bytes=4, dram_stride_inner=4,
               signal="EX" if k in (0, 13) else None)
    b.region("tiles")
    b.preload(0, wait="LD")
    b.preload(4)
    for k in range(4):
        b.matmul(spad_addr=8 * k, n_inner=20 if k % 2 else 6, acc_addr=24 * k, swap=1,
                 wait="LD" if k == 1 else None, signal="VX" if k == 3 else None)
        if k < 2:
            b.preload(16 + 4 * k)
    b.vector(acc_addr=0, spad_addr=200, param_addr=200, n=16, wait="EX", signal="ST")
    b.eltwise(a_addr=200, b_addr=200, dst=220, n_inner=16)
    b.store(src=200, n_inner=16, row_bytes=4, dram_addr=2048, dram_stride_inner=4, wait="VX")
    b.barrier()
    b.region("after")
    b.sync("LD")
    b.store(src=220, n_inner=4, row_bytes=4, dram_addr=3072, dram_stride_inner=4)
    return b.build()


def test_engine_accounting_matches_cycle_oracle():
    ref = pytest.importorskip("npu.runtime.reference")
    result = ref.run_reference(_tiled_program())
    prof = Profile.from_result(result)
    oracle = _oracle(result)
    for name, (busy, stalled, idle) in oracle.items():
        e = prof.engine(name)
        assert (e.busy, e.stalled, e.idle) == (busy, stalled, idle), name
        assert sum(e.stalled_by_reason.values()) == e.stalled
    ex = prof.engine("EX")
    ex_sum = int(prof.instructions["busy"][prof.instructions["engine"] == Engine.EX].sum())
    assert ex.busy < ex_sum, "PRELOAD overlapped MATMUL: the union is smaller than the sum"
    # The dispatcher was held by the full LD queue and by the BARRIER's drain.
    d = prof.engine(DISPATCHER)
    disp = result.trace.dispatch
    barrier = next(i for i, ins in enumerate(result.program.decoded())
                   if ins.opcode == Opcode.BARRIER)
    assert d.stalled_by_reason["BARRIER drain"] == disp[barrier] - disp[barrier - 1] - 1 > 0
    assert d.stalled_by_reason["LD queue full"] > 0
    assert d.busy + d.stalled == result.trace.dispatch.max() + 1
    trace = prof.to_perfetto()
    held = [e for e in trace["traceEvents"] if e.get("cat") == "dispatch"]
    assert sum(e["dur"] for e in held) == d.stalled


def _gemm_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "gemm.py"
    spec = importlib.util.spec_from_file_location("_gemm_example_profile", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_example_totals():
    """MACs, bytes and utilization of the tiled GEMM example against its shape."""
    ref = pytest.importorskip("npu.runtime.reference")
    m, k, n = 32, 48, 32
    program, inputs, expected = _gemm_example().build_gemm("npu16", m, k, n, seed=1)
    result = ref.run_reference(program, inputs)
    np.testing.assert_array_equal(result.outputs()["C"], expected)
    prof = Profile.from_result(result)
    assert prof.macs == m * k * n
    assert prof.dram_read >= m * k + k * n
    assert prof.dram_write >= m * n
    assert 0 < prof.utilization <= 1
    assert prof.utilization == pytest.approx(m * k * n / (result.cycles * 256))
