"""The numba engine: executes a program cycle-exactly and bit-exactly, fast.

It implements the timing contract of ``docs/architecture.md`` (retire, start, dispatch phases per
cycle) and the semantics of ``npu/numerics.py``; it gives the same memories, cycles,
:class:`~npu.runtime.result.Trace` and :class:`~npu.runtime.result.NPUFault` as the reference
interpreter (``npu.runtime.reference``), which ``tests/runtime/test_differential.py`` checks.

Split of the work:

* Python (:func:`prepare`): validate the program, decode it into a field matrix with
  :func:`npu.isa.field_arrays`, and take each instruction's unit, busy cycles and latency from
  :func:`npu.isa.timing_arrays` (timing facts live only in the ISA module). With
  ``validate=False`` each instruction also gets a *static fault* code (illegal encoding or
  :func:`npu.isa.address_error`) that the kernel raises when the dispatcher reaches it, so nothing
  out of range is ever touched.
* ``@njit`` (:func:`_simulate`): the scheduler loop over typed arrays, event driven: after a cycle
  in which no phase did anything it jumps to the next cycle at which a completion, a unit, a weight
  bank or a dispatch delay can change the outcome (identical to stepping every cycle). The memory
  effects are the kernels of :mod:`npu.runtime._kernels`. All state lives in arrays, so the kernel
  can stop after a number of retirements and resume: that is how the progress bar works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from npu.isa import (
    LAYOUTS,
    OPCODE_ENGINE,
    Engine,
    Fault,
    ISAError,
    NPUConfig,
    Opcode,
    Unit,
    address_error,
    decode,
    field_arrays,
    static_faults,
    timing_arrays,
)
from npu.program import Program
from npu.runtime._kernels import (
    F_OPCODE,
    F_SIGNAL,
    F_SWAP,
    F_WAIT,
    FIELD_COLUMN,
    N_FIELDS,
    NJIT,
    exec_eltwise,
    exec_gather,
    exec_load,
    exec_matmul,
    exec_preload,
    exec_store,
    exec_vector,
    gather_ok,
)
from npu.runtime.result import NPUFault, RunResult, Stall, Trace

__all__ = ["Prepared", "prepare", "execute", "run"]

# Opcodes, units, faults and stall codes as plain ints (compile-time constants in the kernel).
OP_LOAD, OP_GATHER, OP_PRELOAD = int(Opcode.LOAD), int(Opcode.GATHER), int(Opcode.PRELOAD)
OP_MATMUL, OP_VECTOR, OP_ELTWISE = int(Opcode.MATMUL), int(Opcode.VECTOR), int(Opcode.ELTWISE)
OP_STORE, OP_SYNC = int(Opcode.STORE), int(Opcode.SYNC)
OP_BARRIER, OP_HALT = int(Opcode.BARRIER), int(Opcode.HALT)
UNIT_NONE = int(Unit.NONE)
ENGINE_VX = int(Engine.VX)
N_UNITS = len(Unit)
N_ENGINES = len(Engine)
FAULT_ILLEGAL = int(Fault.ILLEGAL_INSTRUCTION)
FAULT_ADDRESS = int(Fault.ADDRESS_OUT_OF_RANGE)
FAULT_DEADLOCK = int(Fault.TOKEN_DEADLOCK)
FAULT_WATCHDOG = int(Fault.WATCHDOG)
FAULT_OVERFLOW = int(Fault.TOKEN_OVERFLOW)
ST_UNIT, ST_TOKEN, ST_BANK = int(Stall.UNIT), int(Stall.TOKEN), int(Stall.BANK)
ST_PRELOAD, ST_RETIRE, ST_HAZARD = int(Stall.PRELOAD), int(Stall.RETIRE), int(Stall.HAZARD)

# Rows of the trace matrix.
T_DISPATCH, T_READY, T_START, T_COMPLETE, T_RETIRE, T_STALL, T_ENGINE = range(7)
# Scalar machine state (int64 vector), kept between resumptions of the kernel.
(S_T, S_PC, S_HALTED, S_HALT_D, S_ACTIVE, S_PRELOAD_C, S_VX_C, S_N_DISP, S_N_RET,
 S_FAULT_CODE, S_FAULT_CYCLE, S_FAULT_INDEX, S_CYCLES) = range(13)
N_SCALARS = 13
# Per-engine state columns: queue ring head/length, in-flight ring head/length, last start and
# last retirement cycles.
E_QHEAD, E_QLEN, E_IHEAD, E_ILEN, E_LAST_START, E_LAST_RETIRE = range(6)
# Config vector.
C_QUEUE_DEPTH, C_RETIRE_DEPTH, C_TOKEN_MAX, C_LIMIT = range(4)
# Kernel return codes.
DONE, PAUSED, FAULTED = 0, 1, 2



@njit(**NJIT)
def _simulate(F, unit, busy, lat, eng, sfault, cfgv, dram, spad, acc, wbank, wbank_f, xbuf,
              ybuf, trace, st, es, queue, infl, tok, tok_rise, unit_free, bank_free,
              stop_retired):
    """Run the machine from the state in ``st``/``es``/... until it ends (DONE), faults
    (FAULTED; code, cycle, index in ``st``) or has retired ``stop_retired`` instructions
    (PAUSED, at the start of a cycle: calling again resumes exactly there)."""
    n = F.shape[0]
    qd, rd = cfgv[C_QUEUE_DEPTH], cfgv[C_RETIRE_DEPTH]
    token_max, limit = cfgv[C_TOKEN_MAX], cfgv[C_LIMIT]
    t, pc, halted, halt_d = st[S_T], st[S_PC], st[S_HALTED], st[S_HALT_D]
    active, preload_c, vx_c = st[S_ACTIVE], st[S_PRELOAD_C], st[S_VX_C]
    n_disp, n_ret = st[S_N_DISP], st[S_N_RET]
    fault, f_cycle, f_index = 0, 0, 0
    status = DONE
    while True:
        if n_ret >= stop_retired:
            status = PAUSED
            break
        did = False
        # Phase 1: retire the oldest in-flight instruction of each engine if it is complete.
        for e in range(N_ENGINES):
            if es[e, E_ILEN] == 0:
                continue
            i = infl[e, es[e, E_IHEAD]]
            if trace[T_COMPLETE, i] > t:
                continue
            trace[T_RETIRE, i] = t
            es[e, E_LAST_RETIRE] = t
            es[e, E_IHEAD] = (es[e, E_IHEAD] + 1) % rd
            es[e, E_ILEN] -= 1
            n_ret += 1
            did = True
            sig = F[i, F_SIGNAL]
            for d in range(N_ENGINES):
                if (sig >> d) & 1:
                    if tok[e, d] + 1 > token_max:
                        fault, f_cycle, f_index = FAULT_OVERFLOW, t, i
                        break
                    if tok[e, d] == 0:
                        tok_rise[e, d] = t
                    tok[e, d] += 1
            if fault:
                break
        if fault:
            break
        # The program ends at the first cycle at which HALT was dispatched and nothing is
        # pending: t = max(r, halt dispatch + 1).
        if halted and n_ret == n_disp:
            st[S_CYCLES] = t
            break
        if t >= limit:
            fault, f_cycle = FAULT_WATCHDOG, limit
            break
        # Phase 2: start the head of each engine's queue if every condition holds.
        for e in range(N_ENGINES):
            if es[e, E_QLEN] == 0:
                continue
            i = queue[e, es[e, E_QHEAD]]
            if trace[T_DISPATCH, i] > t - 1:
                continue
            u = unit[i]
            if u != UNIT_NONE and t < unit_free[u]:
                continue
            wait = F[i, F_WAIT]
            ok = True
            for s in range(N_ENGINES):
                if (wait >> s) & 1 and tok[s, e] < 1:
                    ok = False
            if not ok or es[e, E_ILEN] >= rd:
                continue
            op = F[i, F_OPCODE]
            if op == OP_PRELOAD and t < bank_free[1 - active]:
                continue
            if op == OP_MATMUL and F[i, F_SWAP] != 0 and t < preload_c:
                continue
            if op == OP_ELTWISE and t < vx_c:
                continue
            # It starts. Its stall reason is the lowest-coded condition that still failed at
            # t - 1, i.e. among those satisfied last (each is monotone while it waits).
            ready = max(trace[T_DISPATCH, i] + 1, es[e, E_LAST_START] + 1)
            stall = 0
            if t > ready:
                tok_late = False
                for s in range(N_ENGINES):
                    if (wait >> s) & 1 and tok_rise[s, e] == t:
                        tok_late = True
                if u != UNIT_NONE and unit_free[u] == t:
                    stall = ST_UNIT
                elif tok_late:
                    stall = ST_TOKEN
                elif op == OP_PRELOAD and bank_free[1 - active] == t:
                    stall = ST_BANK
                elif op == OP_MATMUL and F[i, F_SWAP] != 0 and preload_c == t:
                    stall = ST_PRELOAD
                elif es[e, E_LAST_RETIRE] == t and es[e, E_ILEN] + 1 >= rd:
                    stall = ST_RETIRE
                elif op == OP_ELTWISE and vx_c == t:
                    stall = ST_HAZARD
            for s in range(N_ENGINES):
                if (wait >> s) & 1:
                    tok[s, e] -= 1
            c = t + lat[i]
            trace[T_READY, i] = ready
            trace[T_START, i] = t
            trace[T_COMPLETE, i] = c
            trace[T_STALL, i] = stall
            if u != UNIT_NONE:
                unit_free[u] = t + busy[i]
            if e == ENGINE_VX:
                vx_c = c
            es[e, E_QHEAD] = (es[e, E_QHEAD] + 1) % qd
            es[e, E_QLEN] -= 1
            infl[e, (es[e, E_IHEAD] + es[e, E_ILEN]) % rd] = i
            es[e, E_ILEN] += 1
            es[e, E_LAST_START] = t
            did = True
            # Memory effects, atomically at the start (engines in the order LD, EX, VX, ST).
            f = F[i]
            if op == OP_MATMUL:
                if f[F_SWAP] != 0:
                    active = 1 - active
                bank_free[active] = max(bank_free[active], c)
                exec_matmul(f, spad, acc, wbank, wbank_f, active, xbuf, ybuf)
            elif op == OP_PRELOAD:
                preload_c = c
                exec_preload(f, spad, wbank, wbank_f, 1 - active)
            elif op == OP_LOAD:
                exec_load(f, dram, spad, acc)
            elif op == OP_STORE:
                exec_store(f, dram, spad, acc)
            elif op == OP_VECTOR:
                exec_vector(f, spad, acc)
            elif op == OP_ELTWISE:
                exec_eltwise(f, spad)
            elif op == OP_GATHER:
                if not gather_ok(f, dram):
                    fault, f_cycle, f_index = FAULT_ADDRESS, t, i
                    break
                exec_gather(f, dram, spad, acc)
        if fault:
            break
        # Phase 3: dispatch at most one instruction.
        if not halted:
            if pc >= n:
                fault, f_cycle, f_index = FAULT_ILLEGAL, t, pc
                break
            if sfault[pc] != 0:
                fault, f_cycle, f_index = sfault[pc], t, pc
                break
            op = F[pc, F_OPCODE]
            if op == OP_HALT or op == OP_BARRIER:
                if op == OP_HALT or n_ret == n_disp:  # BARRIER waits for all earlier ones
                    # Recorded as one cycle at the dispatcher: s = d, c = r = d + 1.
                    trace[T_DISPATCH, pc] = t
                    trace[T_READY, pc] = t
                    trace[T_START, pc] = t
                    trace[T_COMPLETE, pc] = t + 1
                    trace[T_RETIRE, pc] = t + 1
                    if op == OP_HALT:
                        halted, halt_d = 1, t
                    pc += 1
                    did = True
            else:
                e = eng[pc]
                if es[e, E_QLEN] < qd:
                    queue[e, (es[e, E_QHEAD] + es[e, E_QLEN]) % qd] = pc
                    es[e, E_QLEN] += 1
                    trace[T_DISPATCH, pc] = t
                    trace[T_ENGINE, pc] = e
                    n_disp += 1
                    pc += 1
                    did = True
        if did:
            t += 1
            continue
        in_flight = 0
        for e in range(N_ENGINES):
            in_flight += es[e, E_ILEN]
        if in_flight == 0:  # nothing happened and nothing ever will
            fault, f_cycle, f_index = FAULT_DEADLOCK, t, pc
            for e in range(N_ENGINES):
                if es[e, E_QLEN] > 0:
                    f_index = min(f_index, queue[e, es[e, E_QHEAD]])
            break
        # Idle cycle: jump to the first later cycle at which a time threshold is reached (a
        # completion, a unit, a weight bank, a preload, the vector pipeline, the watchdog);
        # the cycles in between would all be copies of this one.
        nxt = limit if limit > t else t + 1
        for e in range(N_ENGINES):
            if es[e, E_ILEN] > 0:
                c = trace[T_COMPLETE, infl[e, es[e, E_IHEAD]]]
                if c > t:
                    nxt = min(nxt, c)
            if es[e, E_QLEN] > 0:
                i = queue[e, es[e, E_QHEAD]]
                u = unit[i]
                if u != UNIT_NONE and unit_free[u] > t:
                    nxt = min(nxt, unit_free[u])
                op = F[i, F_OPCODE]
                if op == OP_PRELOAD and bank_free[1 - active] > t:
                    nxt = min(nxt, bank_free[1 - active])
                if op == OP_MATMUL and preload_c > t:
                    nxt = min(nxt, preload_c)
                if op == OP_ELTWISE and vx_c > t:
                    nxt = min(nxt, vx_c)
        t = nxt
    if fault == FAULT_WATCHDOG:  # names the lowest-numbered instruction still pending
        f_index = pc
        for e in range(N_ENGINES):
            if es[e, E_QLEN] > 0:
                f_index = min(f_index, queue[e, es[e, E_QHEAD]])
            if es[e, E_ILEN] > 0:
                f_index = min(f_index, infl[e, es[e, E_IHEAD]])
    if fault:
        status = FAULTED
    st[S_T], st[S_PC], st[S_HALTED], st[S_HALT_D] = t, pc, halted, halt_d
    st[S_ACTIVE], st[S_PRELOAD_C], st[S_VX_C] = active, preload_c, vx_c
    st[S_N_DISP], st[S_N_RET] = n_disp, n_ret
    st[S_FAULT_CODE], st[S_FAULT_CYCLE], st[S_FAULT_INDEX] = fault, f_cycle, f_index
    return status


# --------------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A program decoded for the kernel: field matrix, timing and static fault per instruction."""

    program: Program
    fields: np.ndarray        # int64 [N, N_FIELDS]
    unit: np.ndarray          # int64 [N]
    busy: np.ndarray          # int64 [N]
    latency: np.ndarray       # int64 [N]
    engine: np.ndarray        # int64 [N], -1 for BARRIER/HALT/illegal
    static_fault: np.ndarray  # int64 [N], Fault code raised at dispatch (0: none)


_ENGINE_OF_OPCODE = np.full(16, -1, dtype=np.int64)
for _op, _eng in OPCODE_ENGINE.items():
    if _eng is not None:
        _ENGINE_OF_OPCODE[int(_op)] = int(_eng)


def prepare(program: Program, validate: bool = True) -> Prepared:
    """Decode ``program`` for the kernel. With ``validate`` the program must pass
    :meth:`Program.validate` (raises :class:`~npu.program.ProgramError`); without, every illegal
    or out-of-range instruction is flagged and faults when it is dispatched."""
    if validate:
        program.validate()
    fa = field_arrays(program.instructions)
    unit, busy, latency = timing_arrays(fa, program.config)
    opcode = fa["opcode"]
    # The field matrix, one row per instruction; filled per opcode with only its own fields
    # (most of the columns of a row are other opcodes' fields, which read 0).
    fields = np.zeros((program.n_instructions, N_FIELDS), dtype=np.int64)
    for op, layout in LAYOUTS.items():
        sel = np.flatnonzero(opcode == int(op))
        if sel.size:
            cols = [FIELD_COLUMN[k] for k in layout]
            fields[sel[:, None], cols] = np.stack([fa[k][sel] for k in layout], axis=1)
    engine = _ENGINE_OF_OPCODE[opcode]
    engine = np.where(opcode == OP_SYNC, fa["engine"], engine).astype(np.int64)
    static = np.zeros(program.n_instructions, dtype=np.int64) if validate else \
        static_faults(program.instructions, program.config, program.dram_bytes)
    return Prepared(program, fields, unit.astype(np.int64), busy.astype(np.int64),
                    latency.astype(np.int64), engine, static)


def execute(prep: Prepared, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray, *,
            watchdog: int | None = None, progress: bool = False) -> tuple[int, Trace]:
    """Run a prepared program on the given memories (modified in place).

    Returns ``(cycles, trace)``; raises :class:`NPUFault` on a machine fault."""
    cfg: NPUConfig = prep.program.config
    n = prep.program.n_instructions
    if dram.dtype != np.uint8 or dram.shape != (prep.program.dram_bytes,):
        raise ValueError(f"dram must be uint8[{prep.program.dram_bytes}], got "
                         f"{dram.dtype}{list(dram.shape)}")
    if spad.dtype != np.int8 or spad.shape != (cfg.spad_rows, cfg.cols):
        raise ValueError(f"spad must be int8[{cfg.spad_rows}, {cfg.cols}], got "
                         f"{spad.dtype}{list(spad.shape)}")
    if acc.dtype != np.int32 or acc.shape != (cfg.acc_rows, cfg.cols):
        raise ValueError(f"acc must be int32[{cfg.acc_rows}, {cfg.cols}], got "
                         f"{acc.dtype}{list(acc.shape)}")
    for name, arr in (("dram", dram), ("spad", spad), ("acc", acc)):
        if not arr.flags.c_contiguous or not arr.flags.writeable:
            raise ValueError(f"{name} must be a writeable C-contiguous array")
    limit = cfg.watchdog_cycles if watchdog is None else watchdog
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"watchdog must be a positive number of cycles, got {watchdog!r}")
    cfgv = np.array([cfg.queue_depth, cfg.retire_depth, cfg.token_max, limit], dtype=np.int64)
    trace = np.full((7, n), -1, dtype=np.int64)
    trace[T_STALL] = 0
    st = np.zeros(N_SCALARS, dtype=np.int64)
    es = np.zeros((N_ENGINES, 6), dtype=np.int64)
    es[:, E_LAST_START] = -1
    es[:, E_LAST_RETIRE] = -1
    queue = np.zeros((N_ENGINES, cfg.queue_depth), dtype=np.int64)
    infl = np.zeros((N_ENGINES, cfg.retire_depth), dtype=np.int64)
    tok = np.zeros((N_ENGINES, N_ENGINES), dtype=np.int64)
    tok_rise = np.full((N_ENGINES, N_ENGINES), -1, dtype=np.int64)
    unit_free = np.zeros(N_UNITS, dtype=np.int64)
    bank_free = np.zeros(2, dtype=np.int64)
    wbank = np.zeros((2, cfg.rows, cfg.cols), dtype=np.int8)
    wbank_f = np.zeros((2, cfg.rows, cfg.cols), dtype=np.float32)
    xbuf = np.zeros((cfg.acc_rows, cfg.rows), dtype=np.float32)
    ybuf = np.zeros((cfg.acc_rows, cfg.cols), dtype=np.float32)
    args = (prep.fields, prep.unit, prep.busy, prep.latency, prep.engine, prep.static_fault,
            cfgv, dram, spad, acc, wbank, wbank_f, xbuf, ybuf, trace, st, es, queue, infl, tok,
            tok_rise, unit_free, bank_free)
    engine_instrs = int(np.count_nonzero(prep.engine >= 0))
    if progress:
        status = _run_with_progress(args, engine_instrs)
    else:
        status = _simulate(*args, np.int64(n + 1))
    if status == FAULTED:
        code, cycle, index = int(st[S_FAULT_CODE]), int(st[S_FAULT_CYCLE]), \
            int(st[S_FAULT_INDEX])
        raise NPUFault(code, cycle, index, _fault_detail(prep, code, index))
    out = Trace(dispatch=trace[T_DISPATCH], ready=trace[T_READY], start=trace[T_START],
                complete=trace[T_COMPLETE], retire=trace[T_RETIRE], stall=trace[T_STALL],
                engine=trace[T_ENGINE])
    return int(st[S_CYCLES]), out


def _run_with_progress(args: tuple, total: int) -> int:
    """Run the kernel in chunks of retirements, updating a tqdm bar between chunks."""
    from tqdm import tqdm

    st = args[15]
    chunk = max(1, total // 200)
    with tqdm(total=total, unit="instr", desc="npu run", leave=False) as bar:
        while True:
            before = int(st[S_N_RET])
            status = _simulate(*args, np.int64(before + chunk))
            bar.update(int(st[S_N_RET]) - before)
            if status != PAUSED:
                return status


def _fault_detail(prep: Prepared, code: int, index: int) -> str:
    """A human explanation of a fault (the contract's record is only code, cycle, index)."""
    prog = prep.program
    if index >= prog.n_instructions:
        return f"the program has {prog.n_instructions} instructions and no HALT was reached"
    row = prog.instructions[index].astype("<u8").tobytes()
    try:
        ins = decode(row)
    except ISAError as exc:
        return str(exc)
    if code == FAULT_ADDRESS:
        why = address_error(ins, prog.config, prog.dram_bytes)
        return why or f"{ins.opcode.name}: a GATHER index points outside DRAM"
    return ins.opcode.name


def run(program: Program, inputs: dict[str, np.ndarray] | None = None, *,
        engine: str = "numba", watchdog: int | None = None, validate: bool = True,
        progress: bool = False) -> RunResult:
    """Execute ``program`` with ``inputs`` (name -> array, see ``npu.runtime.io``).

    ``engine="numba"`` (default) runs this module's jitted engine, ``"reference"`` the numpy
    reference interpreter; both give identical results. ``watchdog`` overrides the config's
    cycle limit; ``validate=False`` skips load-time validation (bad instructions then fault at
    dispatch, as in hardware); ``progress`` shows a progress bar (numba engine).
    Raises :class:`NPUFault` on a machine fault and ``ProgramError`` on an invalid program."""
    if engine == "reference":
        from npu.runtime.reference import run_reference
        return run_reference(program, inputs, watchdog=watchdog, validate=validate)
    if engine != "numba":
        raise ValueError(f"unknown engine {engine!r}; choose 'numba' or 'reference'")
    from npu.runtime.io import initial_state

    prep = prepare(program, validate)
    dram, spad, acc = initial_state(program, inputs)
    cycles, trace = execute(prep, dram, spad, acc, watchdog=watchdog, progress=progress)
    return RunResult(program, cycles, dram, spad, acc, trace, extra={"executor": "numba"})
