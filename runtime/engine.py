"""The numba engine: executes a program cycle-exactly and bit-exactly, fast.

It implements the timing contract of ``docs/architecture.md`` (retire, start, dispatch phases per
cycle) and the semantics of ``npu/numerics.py``; it gives the same memories, cycles,
:class:`~npu.runtime.result.Trace` and :class:`~npu.runtime.result.NPUFault` as the reference
interpreter (``npu.runtime.reference``), which ``tests/runtime/test_differential.py`` checks.

Split of the work:

* Python (:func:`prepare`): validate the program, decode it into a field matrix with
  :func:`npu.isa.field_matrix` (the rows of :func:`npu.isa.field_arrays`), and take each
  instruction's unit, busy cycles and latency from :func:`npu.isa.timing_arrays` (timing facts
  live only in the ISA module). With ``validate=False`` each instruction also gets its *static
  fault* (:func:`npu.isa.static_faults`: illegal encoding, or what :func:`npu.isa.address_error`
  objects to), which the kernel raises when the dispatcher reaches it, so nothing out of range is
  ever touched. GATHER's indices, which no static check can see, are checked in the kernel.
* ``@njit`` (:func:`npu.runtime._kernels.simulate`): the scheduler loop over typed arrays,
  event driven: after a cycle in which no phase did anything it jumps to the next cycle at which
  a completion, a unit, a weight bank or the watchdog can change the outcome (identical to
  stepping every cycle). The memory effects are the datapath kernels of the same module. All
  state lives in arrays, so the kernel can stop after a number of retirements and resume: that
  is how the progress bar works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from npu.isa import (
    ALL_FIELD_NAMES,
    OPCODE_ENGINE,
    Engine,
    ISAError,
    NPUConfig,
    Unit,
    address_error,
    decode,
    field_matrix,
    static_faults,
    timing_arrays,
)
from npu.program import Program
from npu.runtime._kernels import (
    E_LAST_RETIRE,
    E_LAST_START,
    FAULT_ADDRESS,
    FAULTED,
    N_SCALARS,
    OP_SYNC,
    PAUSED,
    S_CYCLES,
    S_FAULT_CODE,
    S_FAULT_CYCLE,
    S_FAULT_INDEX,
    S_N_RET,
    T_COMPLETE,
    T_DISPATCH,
    T_ENGINE,
    T_READY,
    T_RETIRE,
    T_STALL,
    T_START,
    simulate,
)
from npu.runtime.result import NPUFault, RunResult, Trace

__all__ = ["Prepared", "prepare", "execute", "run"]

# --------------------------------------------------------------------------------------------
# Python side
# --------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """A program decoded for the kernel: field matrix, timing and static fault per instruction."""

    program: Program
    fields: np.ndarray        # int64 [N_FIELDS, N], rows in FIELD_COLUMN order
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
    if not isinstance(program, Program):
        raise TypeError(f"expected an npu.program.Program, got {type(program).__name__}")
    words = program.instructions
    # One decode serves validation, the timing formulas and the kernel: the field matrix's
    # rows are the arrays of npu.isa.field_arrays (and FIELD_COLUMN is their order).
    fields = field_matrix(words)
    fa = dict(zip(ALL_FIELD_NAMES, fields))
    cfg, dram_bytes = program.config, program.dram_bytes
    sane = isinstance(cfg, NPUConfig) and isinstance(dram_bytes, int) and dram_bytes > 0
    static = static_faults(words, cfg, dram_bytes, fields=fa) if sane else None
    if validate:
        program.validate(faults=static)
        static = np.zeros(program.n_instructions, dtype=np.int64)
    elif static is None:
        raise ValueError(f"program has no valid config/dram_bytes ({cfg!r}, {dram_bytes!r})")
    unit, busy, latency = timing_arrays(fa, cfg)
    opcode = fa["opcode"]
    engine = _ENGINE_OF_OPCODE[opcode]
    engine = np.where(opcode == OP_SYNC, fa["engine"], engine).astype(np.int64)
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
    es = np.zeros((len(Engine), E_LAST_RETIRE + 1), dtype=np.int64)
    es[:, E_LAST_START] = -1
    es[:, E_LAST_RETIRE] = -1
    queue = np.zeros((len(Engine), cfg.queue_depth), dtype=np.int64)
    infl = np.zeros((len(Engine), cfg.retire_depth), dtype=np.int64)
    tok = np.zeros((len(Engine), len(Engine)), dtype=np.int64)
    tok_rise = np.full((len(Engine), len(Engine)), -1, dtype=np.int64)
    unit_free = np.zeros(len(Unit), dtype=np.int64)
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
        status = _run_with_progress(args, st, engine_instrs)
    else:
        status = simulate(*args, np.int64(n + 1))
    if status == FAULTED:
        code, cycle, index = int(st[S_FAULT_CODE]), int(st[S_FAULT_CYCLE]), \
            int(st[S_FAULT_INDEX])
        raise NPUFault(code, cycle, index, _fault_detail(prep, code, index))
    out = Trace(dispatch=trace[T_DISPATCH], ready=trace[T_READY], start=trace[T_START],
                complete=trace[T_COMPLETE], retire=trace[T_RETIRE], stall=trace[T_STALL],
                engine=trace[T_ENGINE])
    return int(st[S_CYCLES]), out


def _run_with_progress(args: tuple, st: np.ndarray, total: int) -> int:
    """Run the kernel in chunks of about 1/200 of the retirements, updating a tqdm bar between
    chunks (the kernel pauses at a cycle boundary and resumes from the state in ``args``)."""
    from tqdm import tqdm

    chunk = max(1, total // 200)
    with tqdm(total=total, unit="instr", desc="npu run", leave=False) as bar:
        while True:
            before = int(st[S_N_RET])
            status = simulate(*args, np.int64(before + chunk))
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
