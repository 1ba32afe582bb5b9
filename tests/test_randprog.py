"""npu.randprog: random programs are valid, race free (by an independent happens-before check),
run without fault on the reference interpreter, and cover every kind, field feature, boundary
and stall reason; fault programs fault as asked; the race checker finds real races."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from npu.builder import ProgramBuilder
from npu.isa import PRESETS, Engine, Fault, Opcode, footprint
from npu.program import Program
from npu.randprog import (
    FAULT_KINDS,
    KINDS,
    f32_scale_bits,
    fault_program,
    find_races,
    program_strategy,
    random_inputs,
    random_program,
)
from npu.runtime.reference import run_reference
from npu.runtime.result import NPUFault, Stall

CONFIGS = [PRESETS["npu4"], PRESETS["npu8"], PRESETS["npu16"],
           dataclasses.replace(PRESETS["npu4"], name="tight4", queue_depth=2, retire_depth=3,
                               token_max=120, dram_latency=3, vx_depth=1)]


def features(program: Program) -> set[str]:
    """The generator features a program exercises."""
    cfg = program.config
    out: set[str] = set()
    for ins in program.decoded():
        f = ins.fields
        op = ins.opcode
        out.add(op.name)
        if ins.wait:
            out.add("tokens")
        if op == Opcode.SYNC:
            out.add(f"SYNC_{Engine(f['engine']).name}")
        if f.get("n_outer", 1) > 1:
            out.add(f"{op.name}_2d")
        if any(f.get(k) == 1 for k in ("n", "n_inner")) and f.get("n_outer", 1) == 1:
            out.add("n=1")
        if "mem" in f:
            if f["mem"] == 1:
                out.add(f"{op.name}_acc")
            if f["row_bytes"] == cfg.mem_row_bytes(f["mem"]):
                out.add("full_row")
        if op == Opcode.LOAD and f["fill"]:
            out.add("LOAD_fill")
        if op == Opcode.GATHER and f["n"] == cfg.gather_max:
            out.add("GATHER_max")
        if op == Opcode.MATMUL:
            out.update(k for k in ("accumulate", "swap") if f[k])
            if f["spad_stride_inner"] == 0:
                out.add("MATMUL_broadcast")
        if op == Opcode.ELTWISE:
            out.add(("ELT_ADD", "ELT_MAX")[f["func"]])
            # The ends of the multipliers' and shift's ranges (unsigned 23-bit, 5-bit).
            if 0 in (f["a_mult"], f["b_mult"]):
                out.add("ELT_mult_0")
            if (1 << 23) - 1 in (f["a_mult"], f["b_mult"]):
                out.add("ELT_mult_max")
            out.update({0: ["ELT_shift_0"], 31: ["ELT_shift_max"]}.get(f["shift"], []))
            if f["dst"] in (f["a_addr"], f["b_addr"]):
                out.add("ELT_in_place")
        if op == Opcode.VECTOR and f["fp32"]:
            out.add("VECTOR_fp32")
        if op in (Opcode.VECTOR, Opcode.ELTWISE) and f["clamp_min"] > f["clamp_max"]:
            out.add("clamp_inverted")
        for space, _, end in footprint(ins, cfg):
            if (space, end) in (("spad", cfg.spad_rows), ("acc", cfg.acc_rows),
                                ("dram", program.dram_bytes)):
                out.add(f"last_{space}")
    return out


@pytest.fixture(scope="module")
def batch() -> list[tuple[Program, dict, object]]:
    """A fixed batch of random programs with their inputs and reference results."""
    out = []
    for seed in range(48):
        rng = np.random.default_rng(seed)
        cfg = CONFIGS[seed % len(CONFIGS)]
        prog = random_program(rng, cfg, int(rng.integers(30, 110)))
        inputs = random_inputs(rng, prog)
        out.append((prog, inputs, run_reference(prog, inputs)))
    return out


def test_programs_validate_and_run(batch) -> None:
    for prog, _, result in batch:
        prog.validate()
        assert Program.from_bytes(prog.to_bytes()).to_bytes() == prog.to_bytes()
        assert result.cycles > 0
        assert (result.trace.retire[:-1] >= 0).all()          # everything before HALT retired
        assert prog.decoded()[-1].opcode == Opcode.HALT


def test_programs_are_race_free(batch) -> None:
    for prog, _, _ in batch:
        assert find_races(prog) == []


def test_signals_and_waits_pair_up_in_program_order(batch) -> None:
    for prog, _, _ in batch:
        instrs = prog.decoded()
        for a in Engine:
            for b in Engine:
                if a == b:
                    continue
                sig = [i for i, x in enumerate(instrs) if x.engine == a and x.signal >> b & 1]
                wai = [i for i, x in enumerate(instrs) if x.engine == b and x.wait >> a & 1]
                assert len(sig) == len(wai)
                assert all(s < w for s, w in zip(sig, wai))


def test_batch_covers_every_kind_feature_and_boundary(batch) -> None:
    seen: set[str] = set()
    for prog, _, _ in batch:
        seen |= features(prog)
    wanted = {k.name for k in KINDS} | {
        "tokens", "SYNC_LD", "SYNC_EX", "SYNC_VX", "SYNC_ST", "LOAD_2d", "STORE_2d",
        "MATMUL_2d", "ELTWISE_2d", "n=1", "LOAD_acc", "GATHER_acc", "STORE_acc", "full_row",
        "LOAD_fill", "GATHER_max", "accumulate", "swap", "MATMUL_broadcast", "ELT_ADD",
        "ELT_MAX", "ELT_in_place", "clamp_inverted", "last_spad", "last_acc", "last_dram",
        "VECTOR_fp32", "ELT_mult_0", "ELT_mult_max", "ELT_shift_0", "ELT_shift_max"}
    assert wanted <= seen, sorted(wanted - seen)


def test_eltwise_adds_often_land_in_the_int8_range(batch) -> None:
    """Many random ELTWISE ADDs have multipliers scaled to their shift as a compiler makes
    them, so that their results are spread over int8 instead of saturated or rounded to 0."""
    a, b = (v.ravel() for v in np.meshgrid(np.arange(-128, 128), np.arange(-128, 128)))
    spread = adds = 0
    for prog, _, _ in batch:
        for ins in prog.decoded():
            f = ins.fields
            if ins.opcode == Opcode.ELTWISE and f["func"] == 0:
                adds += 1
                t = (a - f["a_zero"]) * f["a_mult"] + (b - f["b_zero"]) * f["b_mult"]
                y = np.clip(np.round(t / 2.0 ** f["shift"]), -128, 127)   # float is fine here
                spread += np.unique(y).size > 64
    assert adds > 50 and spread > adds / 4, (spread, adds)


def test_fp32_vectors_are_a_fair_share_and_use_float_scales(batch) -> None:
    """About FP32_SHARE of the VECTORs have fp32=1, and most of those read the loaded float32
    parameter set (a normal scale in [2**-20, 2**-2) in most lanes)."""
    vectors = useful = 0
    fp32 = []
    for prog, _, _ in batch:
        instrs = prog.decoded()
        first = instrs[0].fields
        dram = prog.initial_dram()
        for ins in instrs:
            if ins.opcode != Opcode.VECTOR:
                continue
            vectors += 1
            if not ins.fields["fp32"]:
                continue
            fp32.append(ins)
            rel = ins.fields["param_addr"] - first["dst"]
            if instrs[0].opcode == Opcode.LOAD and first["mem"] == 1 and 0 <= rel < 9:
                row = rel + 1                      # the multiplier row, in loaded order
                raw = dram[row * prog.config.acc_row_bytes:][:prog.config.acc_row_bytes]
                exp = raw.view("<i4").astype(np.int64) >> 23 & 0xFF    # |scale| in 2**-20..
                useful += np.mean((exp >= 127 - 20) & (exp < 127 - 2)) > 0.5  # ..2**-2
    assert 0.25 < len(fp32) / vectors < 0.55, (len(fp32), vectors)
    assert useful > len(fp32) / 2, (useful, len(fp32))


def test_f32_scale_bits_classes() -> None:
    bits = f32_scale_bits(np.random.default_rng(1), 5000).astype(np.int64) & 0xFFFFFFFF
    exp = bits >> 23 & 0xFF
    normal = (exp >= 127 - 20) & (exp < 127 - 2)
    assert normal.mean() > 0.85
    negative, power_of_two = (bits >> 31 == 1) & normal, normal & (bits & 0x7FFFFF == 0)
    for cls in (exp == 0, exp == 0xFF, negative, power_of_two):
        assert 0.005 < cls.mean() < 0.3
    assert (~normal).mean() < 0.1
    plain = f32_scale_bits(np.random.default_rng(1), 500, special=0.0).astype(np.int64)
    assert ((plain >> 23 & 0xFF) >= 127 - 20).all() and ((plain >> 23 & 0xFF) < 127 - 2).all()


def test_every_program_has_every_kind() -> None:
    for seed in range(6):
        prog = random_program(np.random.default_rng(seed), "npu8", len(KINDS) + 1)
        assert {k.name for k in KINDS} <= features(prog)


def test_batch_hits_every_stall_reason(batch) -> None:
    stalls = set()
    for _, _, result in batch:
        stalls.update(int(s) for s in result.trace.stall)
    assert stalls == {int(s) for s in Stall}


def test_idle_skipping_changes_nothing(batch) -> None:
    for prog, inputs, result in batch[:6]:
        slow = run_reference(prog, inputs, skip_idle=False)
        assert slow.cycles == result.cycles and slow.trace.equal(result.trace)
        assert np.array_equal(slow.dram, result.dram) and np.array_equal(slow.acc, result.acc)


def test_kinds_restriction_and_arguments() -> None:
    rng = np.random.default_rng(7)
    prog = random_program(rng, "npu4", 30, kinds=["load", Opcode.STORE])
    assert {i.opcode for i in prog.decoded()} <= {Opcode.LOAD, Opcode.STORE, Opcode.HALT}
    assert len(prog.decoded()) == 31
    run_reference(prog, random_inputs(rng, prog))
    assert random_program(rng, "npu4", 0).n_instructions == 1
    with pytest.raises(ValueError, match="token_max"):
        random_program(rng, "npu4", 300)
    with pytest.raises(ValueError, match="unknown instruction kind"):
        random_program(rng, "npu4", 5, kinds=["nop"])
    with pytest.raises(ValueError, match="HALT"):
        random_program(rng, "npu4", 5, kinds=[Opcode.HALT])


def test_same_seed_same_program() -> None:
    a = random_program(np.random.default_rng(11), "npu8", 50)
    b = random_program(np.random.default_rng(11), "npu8", 50)
    assert a.to_bytes() == b.to_bytes()


def test_random_inputs_fill_each_binding() -> None:
    b = ProgramBuilder("npu4")
    b.input("a", (3, 2), "int8")
    b.input("w", (4,), "int32")
    b.input("f", (2,), "float32")
    inputs = random_inputs(np.random.default_rng(0), b.build())
    assert {k: (v.shape, v.dtype.name) for k, v in inputs.items()} == {
        "a": ((3, 2), "int8"), "w": ((4,), "int32"), "f": ((2,), "float32")}


# --------------------------------------------------------------------------------------------
# The race checker
# --------------------------------------------------------------------------------------------

def test_find_races_sees_a_missing_token() -> None:
    def build(tokens: bool) -> Program:
        b = ProgramBuilder("npu4", dram_bytes=256)
        b.load(dram_addr=0, dst=0, n_inner=4, row_bytes=4, signal="EX" if tokens else None)
        b.preload(0, wait="LD" if tokens else None)
        b.sync("ST")                                        # touches nothing
        b.store(dram_addr=64, src=8, n_inner=1, row_bytes=4)   # unrelated rows
        return b.build()
    assert find_races(build(True)) == []
    races = find_races(build(False))
    assert len(races) == 1 and "instructions 0 (LOAD on LD) and 1 (PRELOAD on EX)" in races[0]


def test_find_races_follows_chains_and_barriers() -> None:
    b = ProgramBuilder("npu4", dram_bytes=256)
    b.load(dram_addr=0, dst=0, n_inner=1, row_bytes=4, signal="EX")   # writes SPAD row 0
    b.sync("EX", wait="LD", signal="VX")                              # LD -> EX -> VX chain
    b.eltwise(a_addr=0, b_addr=0, dst=4, n_inner=1, wait="EX")        # reads row 0: ordered
    b.store(dram_addr=0, src=4, n_inner=1, row_bytes=4)               # reads row 4: race
    b.barrier()
    b.load(dram_addr=0, dst=4, n_inner=1, row_bytes=4)                # after the barrier: ok
    races = find_races(b.build())
    assert len(races) == 2
    assert "0 (LOAD on LD) and 3 (STORE on ST) both touch dram" in races[0]  # read vs write
    assert "2 (ELTWISE on VX) and 3 (STORE on ST) both touch spad" in races[1]


def test_stripping_tokens_from_random_programs_creates_races() -> None:
    racy = 0
    for seed in range(8):
        prog = random_program(np.random.default_rng(seed), "npu4", 40)
        words = prog.instructions.copy()
        words[:, 0] &= ~np.uint64(0xFF0)          # clear every wait and signal mask
        stripped = dataclasses.replace(prog, instructions=words)
        racy += bool(find_races(stripped))
    assert racy >= 6


# --------------------------------------------------------------------------------------------
# Fault programs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FAULT_KINDS, ids=lambda k: k.name)
def test_fault_programs_fault_as_asked(kind: Fault) -> None:
    variants = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        cfg = CONFIGS[seed % 3]
        prog = fault_program(rng, cfg, kind)
        assert prog.metadata["fault"] == kind.name
        variants.add(prog.metadata["variant"])
        with pytest.raises(NPUFault) as info:
            run_reference(prog, random_inputs(rng, prog), validate=False)
        assert info.value.code == kind, (seed, prog.metadata, info.value)
    assert len(variants) >= {Fault.ILLEGAL_INSTRUCTION: 4, Fault.ADDRESS_OUT_OF_RANGE: 2,
                             Fault.TOKEN_DEADLOCK: 2}.get(kind, 1), variants


def test_fault_program_arguments() -> None:
    rng = np.random.default_rng(0)
    prog = fault_program(rng, "npu4", "watchdog", n_instructions=5)
    assert prog.config.watchdog_cycles < 1000
    with pytest.raises(ValueError, match="cannot build"):
        fault_program(rng, "npu4", Fault.NONE)


# --------------------------------------------------------------------------------------------
# hypothesis
# --------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program_strategy("npu4", 0, 25))
def test_strategy_programs_run_clean(case) -> None:
    prog, inputs = case
    assert find_races(prog) == []
    result = run_reference(prog, inputs)
    assert set(result.outputs()) == {"dram"}
