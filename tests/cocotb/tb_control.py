"""cocotb testbench of the control (``npu.hw.control.Control``): dispatcher, in-order queues,
token counters, unit timers, in-order retirement, faults and status.

The control alone decides every cycle of the timing contract, so it is checked against the
reference interpreter (``npu.runtime.reference``) on whole programs, without the datapaths:

Driver: random race-free programs and programs built to fault (``npu.randprog``), for a config
with short queues, a small retire depth and a small ``token_max`` (``harness.CONTROL_CONFIG``),
written into the instruction memory, then ``start``. It stands in for the LD unit's GATHER
index check: when the reference says a GATHER faults on an index, the testbench raises
``gather_fault`` (with the GATHER's index and start cycle) when the LD unit would, the cycle its
bad row's first beat is issued.

Monitor: the trace port (dispatch, ready, start + completion, retire of every engine) and the
five unit start ports, every cycle. Scoreboard: every instruction's dispatch, ready, start,
completion and retire cycle, the total cycle count or the fault (code, cycle, index) equal the
reference's; each start reaches exactly its unit's port with the instruction's index and the
start cycle, and EX starts carry the weight bank the contract's bank rules give.

Coverage: stall reasons, queue-full dispatch, BARRIER waits, token pairs, simultaneous starts
and retirements, fault codes and variants.
"""

from __future__ import annotations

from typing import Any

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge
from tbutil import bench_config, fail, finish_coverage, make_rng, params, read_int, start

from npu.conformance import gather_race_case
from npu.coverage import Coverage
from npu.isa import Engine, Fault, NPUConfig, Opcode, Unit, decode, static_faults, timing
from npu.randprog import FAULT_KINDS, fault_program, random_inputs, random_program
from npu.runtime.reference import run_reference
from npu.runtime.result import NPUFault

UNITS = [u for u in Unit if u != Unit.NONE]
EVENTS = ("dispatch", "ready", "start", "complete", "retire")
STALLS = ["NONE", "UNIT", "TOKEN", "BANK", "PRELOAD", "RETIRE", "HAZARD"]


def coverage() -> Coverage:
    cov = Coverage("control (dispatcher + tokens)")
    cov.point("stall", STALLS)
    cov.point("dispatch", ["queue full", "BARRIER waits", "HALT with work in flight"])
    cov.point("wait", [f"{a.name}->{b.name}" for a in Engine for b in Engine if a != b])
    cov.point("parallel", ["2 starts in a cycle", "3+ starts in a cycle",
                           "2+ retirements in a cycle"])
    cov.point("outcome", ["done"] + [f.name for f in FAULT_KINDS])
    cov.point("fault variant", ["no_halt", "opcode", "reserved", "own_engine", "barrier_tokens",
                                "static", "gather_index", "unpaired_wait", "sync_cycle", "limit",
                                "unmatched_signals", "gather_illegal", "gather_bad_address",
                                "gather_watchdog", "gather_overflow"])
    cov.point("held fault", ["a fault waits for a GATHER's index check"])
    return cov


#: Fault code of each fault_program variant (to steer stimulus at coverage holes).
VARIANT_CODE = {"no_halt": Fault.ILLEGAL_INSTRUCTION, "opcode": Fault.ILLEGAL_INSTRUCTION,
                "reserved": Fault.ILLEGAL_INSTRUCTION, "own_engine": Fault.ILLEGAL_INSTRUCTION,
                "barrier_tokens": Fault.ILLEGAL_INSTRUCTION,
                "static": Fault.ADDRESS_OUT_OF_RANGE, "gather_index": Fault.ADDRESS_OUT_OF_RANGE,
                "unpaired_wait": Fault.TOKEN_DEADLOCK, "sync_cycle": Fault.TOKEN_DEADLOCK,
                "limit": Fault.WATCHDOG, "unmatched_signals": Fault.TOKEN_OVERFLOW}
#: Race variants (a GATHER's bad index against a later fault), index in RACE_KINDS.
RACE_VARIANT = {"gather_illegal": 0, "gather_bad_address": 1, "gather_watchdog": 2,
                "gather_overflow": 3}


def _program(rng: np.random.Generator, cfg: NPUConfig, k: int, cov: Coverage,
             total: int) -> tuple[Any, bool] | None:
    """Program ``k``: every third one built to fault (cycling through the fault codes); past
    ``total``, programs aimed at the bins the coverage still misses (None: nothing missing)."""
    if k >= total:
        holes = cov.missed()
        missing = [m.split(": ", 1)[1] for m in holes if m.startswith("fault variant")]
        if missing:
            variant = missing[k % len(missing)]
            if variant in RACE_VARIANT:
                return gather_race_case(cfg, int(rng.integers(1 << 30)),
                                        RACE_VARIANT[variant]).program, False
            code = VARIANT_CODE[variant]
            return fault_program(rng, cfg, code, int(rng.integers(0, 25))), False
        if not holes:
            return None
        # Other holes (stall reasons, ...): programs dense in the instructions involved.
        kinds = None
        if any(h.endswith(("BANK", "PRELOAD")) for h in holes):
            kinds = ["LOAD", "PRELOAD", "MATMUL", "SYNC"]
        elif any(h.endswith("HAZARD") for h in holes):
            kinds = ["LOAD", "VECTOR", "ELTWISE", "SYNC"]
        return random_program(rng, cfg, cfg.token_max - 1, kinds, boundary=0.2), True
    if k % 9 == 5:
        return gather_race_case(cfg, int(rng.integers(1 << 30)), k // 9).program, False
    if k % 3 == 2:
        code = FAULT_KINDS[(k // 3) % len(FAULT_KINDS)]
        return fault_program(rng, cfg, code, int(rng.integers(0, 25))), False
    n = int(rng.integers(1, cfg.token_max))
    return random_program(rng, cfg, n, boundary=0.2), True


def _expected_banks(prog: Any, trace: Any, n: int) -> dict[int, int]:
    """The weight bank each PRELOAD (the shadow one) and MATMUL (after its swap) uses, walking
    EX starts in time order as the contract does."""
    active = 0
    out = {}
    ex = [i for i in range(n) if trace.start[i] >= 0 and trace.engine[i] == Engine.EX]
    for i in sorted(ex, key=lambda i: trace.start[i]):
        ins = decode(prog.instructions[i].astype("<u8").tobytes())
        if ins.opcode == Opcode.PRELOAD:
            out[i] = 1 - active
        elif ins.opcode == Opcode.MATMUL:
            if ins.fields["swap"]:
                active = 1 - active
            out[i] = active
    return out


def decode_or_none(prog: Any, i: int) -> Any:
    try:
        return decode(prog.instructions[i].astype("<u8").tobytes())
    except ValueError:
        return None


def held_seen(dut: Any) -> bool:
    """The control stopped (not running, no status yet): a fault is being held."""
    return not read_int(dut.status_running) and not read_int(dut.status_done)


def _gather_report_cycle(prog: Any, cfg: NPUConfig, index: int, start_cycle: int,
                         dram: np.ndarray) -> int:
    """When the LD unit would flag GATHER ``index``'s first bad row (its first beat)."""
    f = decode(prog.instructions[index].astype("<u8").tobytes()).fields
    beat = cfg.dram_beat_bytes
    idx = dram[f["index_addr"]:f["index_addr"] + 4 * f["n"]].copy().view("<i4")
    for i, v in enumerate(idx.tolist()):
        first = f["dram_addr"] + v * f["row_stride"]
        if v < 0 or first + f["row_bytes"] > prog.dram_bytes:
            return (start_cycle + -(-4 * f["n"] // beat) + cfg.dram_latency
                    + i * -(-f["row_bytes"] // beat))
    raise AssertionError("GATHER has no bad index")


@cocotb.test()
async def control_programs(dut: Any) -> None:
    """Random and faulting programs: trace, unit starts and outcome against the reference."""
    p = params()
    cfg = bench_config(p)
    total = p.get("amount", 40)
    rng = make_rng(dut._log)
    cov = coverage()
    dut.start.value = 0
    dut.gather_fault_valid.value = 0
    dut.gather_fault_index.value = 0
    dut.gather_fault_cycle.value = 0
    await start(dut)
    errors: list[str] = []
    for k in range(4 * total):   # past `total`: closing fault-variant coverage holes
        drawn = _program(rng, cfg, k, cov, total)
        if drawn is None:
            break
        prog, _valid = drawn
        inputs = random_inputs(rng, prog)
        limit = prog.config.watchdog_cycles
        try:
            ref = run_reference(prog, inputs, validate=False)
            fault = None
            end = ref.cycles
        except NPUFault as exc:
            ref, fault, end = None, exc, exc.cycle
        n = prog.n_instructions
        variant = prog.metadata.get("variant")
        if variant:
            cov.sample(**{"fault variant": variant})
        cov.sample(outcome=fault.code.name if fault else "done")
        # A GATHER whose index is bad: when to raise gather_fault.
        gather_bad = None
        if fault is not None and fault.code == Fault.ADDRESS_OUT_OF_RANGE and fault.index < n \
                and not static_faults(prog.instructions[fault.index:fault.index + 1],
                                      prog.config, prog.dram_bytes)[0]:
            from npu.runtime.io import initial_state
            dram = initial_state(prog, inputs)[0]
            gather_bad = (fault.index, fault.cycle, -1)   # report cycle: once it starts
        # Load and start.
        dut.rst.value = 1
        await RisingEdge(dut.clk)
        await RisingEdge(dut.clk)
        dut.rst.value = 0
        for i, row in enumerate(prog.instructions):
            dut.imem[i].value = int.from_bytes(row.astype("<u8").tobytes(), "little")
        dut.n_instr.value = n
        dut.dram_bytes.value = prog.dram_bytes
        dut.watchdog.value = limit
        await RisingEdge(dut.clk)
        dut.start.value = 1
        await RisingEdge(dut.clk)
        dut.start.value = 0
        got = {ev: np.full(n, -1, dtype=np.int64) for ev in EVENTS}
        unit_starts: dict[int, tuple[str, int, int]] = {}
        problems: list[str] = []
        t = 0
        hold_until = -1      # gather_busy held (after a GATHER's start cycle) up to here
        gather_starts: dict[int, int] = {}
        while True:
            dut.gather_hold.value = int(t <= hold_until)
            if gather_bad is not None and gather_bad[0] in gather_starts:
                report = _gather_report_cycle(prog, cfg, gather_bad[0],
                                              gather_starts[gather_bad[0]], dram)
                gather_bad = (gather_bad[0], gather_starts[gather_bad[0]], report)
            if gather_bad is not None and t == gather_bad[2]:
                dut.gather_fault_valid.value = 1
                dut.gather_fault_index.value = gather_bad[0]
                dut.gather_fault_cycle.value = gather_bad[1]
            else:
                dut.gather_fault_valid.value = 0
            await ReadOnly()
            if read_int(dut.status_running) and read_int(dut.trace_cycle) != t:
                problems.append(f"trace.cycle reads {read_int(dut.trace_cycle)} at cycle {t}")
            if read_int(dut.trace_dispatch_valid):
                i = read_int(dut.trace_dispatch_index)
                if i < n:
                    got["dispatch"][i] = t
                    if read_int(dut.trace_dispatch_barrier):
                        got["ready"][i] = got["start"][i] = t
                        got["complete"][i] = got["retire"][i] = t + 1
            starts = retires = 0
            for e in Engine:
                for ev in ("ready", "start", "retire"):
                    if read_int(getattr(dut, f"trace_{ev}_{int(e)}_valid")):
                        i = read_int(getattr(dut, f"trace_{ev}_{int(e)}_index"))
                        if i < n:
                            got[ev][i] = t
                            if ev == "start":
                                got["complete"][i] = read_int(
                                    getattr(dut, f"trace_start_{int(e)}_complete"))
                                starts += 1
                            if ev == "retire":
                                retires += 1
            if starts >= 2:
                cov.sample(parallel="2 starts in a cycle" if starts == 2
                           else "3+ starts in a cycle")
            if retires >= 2:
                cov.sample(parallel="2+ retirements in a cycle")
            for u in UNITS:
                name = u.name.lower()
                if read_int(getattr(dut, f"u_{name}_valid")):
                    i = read_int(getattr(dut, f"u_{name}_index"))
                    if i in unit_starts:
                        problems.append(f"instruction {i} started twice on units")
                    unit_starts[i] = (u.name, read_int(getattr(dut, f"u_{name}_cycle")),
                                      read_int(getattr(dut, f"u_{name}_bank")))
                    ins_i = decode_or_none(prog, i)
                    if u == Unit.LD_DMA and ins_i is not None and ins_i.opcode == Opcode.GATHER:
                        gather_starts[i] = t
                        # The LD unit is busy with it for its busy cycles (a bad one: until
                        # the bad row, when it raises the fault).
                        busy = timing(ins_i, cfg).busy
                        hold_until = max(hold_until, t + busy - 1)
                    if unit_starts[i][1] != t:
                        problems.append(f"cycle {t}: {u.name} start of {i} carries cycle "
                                        f"{unit_starts[i][1]}")
            if read_int(dut.status_fault) == 0 and held_seen(dut):
                cov.sample(**{"held fault": "a fault waits for a GATHER's index check"})
            done, faulted = read_int(dut.status_done), read_int(dut.status_fault)
            await RisingEdge(dut.clk)
            if done or faulted or t > end + 500:
                break
            t += 1
        await ReadOnly()
        status = {k2: read_int(getattr(dut, f"status_{k2}"))
                  for k2 in ("done", "fault", "code", "fault_cycle", "fault_index", "cycles")}
        await RisingEdge(dut.clk)
        # Outcome.
        if fault is not None:
            got_key = (status["code"], status["fault_cycle"], status["fault_index"]) \
                if status["fault"] else None
            if got_key != fault.key():
                problems.append(f"fault {got_key}, reference {fault.key()} ({fault})")
        else:
            if not status["done"] or status["cycles"] != ref.cycles:
                problems.append(f"status done={status['done']} fault={status['fault']} "
                                f"cycles={status['cycles']}, reference ends at {ref.cycles}")
            tr = ref.trace
            for ev in EVENTS:
                want = getattr(tr, ev)
                bad = np.flatnonzero(want != got[ev])
                if bad.size:
                    i = int(bad[0])
                    problems.append(f"{ev} of instruction {i} "
                                    f"({decode(prog.instructions[i].astype('<u8').tobytes()).opcode.name})"
                                    f": {got[ev][i]}, reference {want[i]} ({bad.size} differ)")
            banks = _expected_banks(prog, tr, n)
            for i in range(n):
                ins = decode(prog.instructions[i].astype("<u8").tobytes())
                unit = {Opcode.SYNC: None, Opcode.BARRIER: None, Opcode.HALT: None}.get(
                    ins.opcode, "x")
                if unit is None:
                    if i in unit_starts:
                        problems.append(f"{ins.opcode.name} {i} reached unit "
                                        f"{unit_starts[i][0]}")
                    continue
                from npu.isa import OPCODE_UNIT
                want_unit = OPCODE_UNIT[ins.opcode].name
                if i not in unit_starts or unit_starts[i][0] != want_unit:
                    problems.append(f"{ins.opcode.name} {i} did not reach {want_unit} "
                                    f"(got {unit_starts.get(i)})")
                elif i in banks and unit_starts[i][2] != banks[i]:
                    problems.append(f"{ins.opcode.name} {i} got weight bank "
                                    f"{unit_starts[i][2]}, expected {banks[i]}")
            for s in np.unique(tr.stall[tr.start >= 0]).tolist():
                cov.sample(stall=STALLS[s])
            d = tr.dispatch
            ops = prog.instructions[:, 0] & np.uint64(0xF)
            for g in (np.flatnonzero(d[1:] > d[:-1] + 1) + 1).tolist():
                cov.sample(dispatch="BARRIER waits" if int(ops[g]) == Opcode.BARRIER
                           else "queue full")
            halt = int(np.flatnonzero(ops == Opcode.HALT)[0])
            if tr.retire[:halt].max(initial=-1) > d[halt]:
                cov.sample(dispatch="HALT with work in flight")
            for i in range(n):
                ins = decode(prog.instructions[i].astype("<u8").tobytes())
                if ins.engine is not None:
                    for a in Engine:
                        if ins.wait >> a & 1:
                            cov.sample(wait=f"{a.name}->{ins.engine.name}")
        if problems:
            errors.append(f"program {k} ({prog.metadata.get('fault', 'valid')}, "
                          f"{n} instructions): " + "; ".join(problems[:4]))
            if len(errors) >= 5:
                break
    for e in errors:
        dut._log.error(e)
    finish_coverage(cov, dut._log)
    if errors:
        raise fail(f"{len(errors)} program(s) differ from the reference; first: {errors[0]}")
