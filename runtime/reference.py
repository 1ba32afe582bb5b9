"""The reference interpreter: the timing contract and the semantics, one cycle at a time.

This is the oracle the numba engine and the RTL are compared against, so it is written to be
read next to ``docs/architecture.md`` ("Timing contract", "Semantics", "Faults") rather than to
be fast. Each simulated cycle runs the three phases of the contract in order:

1. retire (per engine, at most one, in program order; signal tokens are added),
2. start (per engine, the head of its queue if every start condition holds; the instruction's
   memory effects are applied at once, engines taken in the order LD, EX, VX, ST),
3. dispatch (at most one instruction from the instruction memory).

Units, busy cycles and latencies come only from :func:`npu.isa.timing`; arithmetic only from
:mod:`npu.numerics`. The one liberty taken is to jump over cycles in which nothing can happen
(nothing retired, started or was dispatched): the machine state is then frozen until the next
time threshold (a completion, a unit or bank becoming free, the watchdog), so the jump changes
no result; ``skip_idle=False`` turns it off and the tests check both agree.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import numpy as np

from npu import numerics
from npu.isa import (
    EltFunc,
    Engine,
    Fault,
    Instr,
    ISAError,
    Opcode,
    Unit,
    address_error,
    decode,
    timing,
)
from npu.program import Program
from npu.runtime.io import initial_state
from npu.runtime.result import NPUFault, RunResult, Stall, Trace

__all__ = ["run_reference"]

_ENGINES = tuple(Engine)


def _bits(mask: int) -> list[int]:
    """Engines named by a token mask, lowest first."""
    return [int(e) for e in _ENGINES if mask >> e & 1]


# --------------------------------------------------------------------------------------------
# Semantics: each function applies one instruction's memory effects (docs "Semantics").
# `spad` is int8 [rows, cols], `acc` int32 [rows, cols]; LOAD/GATHER/STORE move raw bytes, so
# they work on uint8 views of both (ACC little endian).
# --------------------------------------------------------------------------------------------

def _local(mem: int, spad: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """The byte view of the on-chip memory selected by a `mem` field (0 SPAD, 1 ACC)."""
    return spad.view(np.uint8) if mem == 0 else acc.view(np.uint8)


def _exec_load(f: Mapping[str, int], dram: np.ndarray, spad: np.ndarray,
               acc: np.ndarray) -> None:
    mem = _local(f["mem"], spad, acc)
    rb = f["row_bytes"]
    for o in range(f["n_outer"]):
        for i in range(f["n_inner"]):          # later rows win where runs overlap
            row = f["dst"] + o * f["dst_stride_outer"] + i
            if f["fill"]:
                mem[row, :rb] = f["fill_value"] & 0xFF
            else:
                src = f["dram_addr"] + o * f["dram_stride_outer"] + i * f["dram_stride_inner"]
                mem[row, :rb] = dram[src:src + rb]
            mem[row, rb:] = 0


def _exec_gather(f: Mapping[str, int], dram: np.ndarray, spad: np.ndarray, acc: np.ndarray,
                 cycle: int, index: int) -> None:
    n, rb = f["n"], f["row_bytes"]
    raw = dram[f["index_addr"]:f["index_addr"] + 4 * n].copy()
    indices = raw.view("<i4").astype(np.int64)
    for k, idx in enumerate(indices):
        first = f["dram_addr"] + int(idx) * f["row_stride"]
        if idx < 0 or first + rb > len(dram):
            raise NPUFault(Fault.ADDRESS_OUT_OF_RANGE, cycle, index,
                           f"GATHER index {k} = {int(idx)} selects DRAM [{first}, {first + rb}) "
                           f"outside [0, {len(dram)})")
    mem = _local(f["mem"], spad, acc)
    for k, idx in enumerate(indices):
        first = f["dram_addr"] + int(idx) * f["row_stride"]
        mem[f["dst"] + k, :rb] = dram[first:first + rb]
        mem[f["dst"] + k, rb:] = 0


def _strided_rows(base: int, stride_outer: int, stride_inner: int, n_outer: int,
                  n_inner: int) -> np.ndarray:
    """Row addresses base + o*stride_outer + i*stride_inner in (o, i) order."""
    o = np.arange(n_outer, dtype=np.int64)[:, None]
    i = np.arange(n_inner, dtype=np.int64)[None, :]
    return (base + o * stride_outer + i * stride_inner).reshape(-1)


def _exec_matmul(f: Mapping[str, int], spad: np.ndarray, acc: np.ndarray,
                 weights: np.ndarray) -> None:
    rows = _strided_rows(f["spad_addr"], f["spad_stride_outer"], f["spad_stride_inner"],
                         f["n_outer"], f["n_inner"])
    y = numerics.matmul(spad[rows], weights)
    dst = slice(f["acc_addr"], f["acc_addr"] + len(rows))
    if f["accumulate"]:
        y = numerics.wrap_int32(acc[dst].astype(np.int64) + y)
    acc[dst] = y


def _exec_vector(f: Mapping[str, int], spad: np.ndarray, acc: np.ndarray) -> None:
    n = f["n"]
    bias, mult, shift = (acc[f["param_addr"] + k].astype(np.int64) for k in range(3))
    out = numerics.requantize(acc[f["acc_addr"]:f["acc_addr"] + n], bias, mult, shift,
                              f["zero_point"], f["clamp_min"], f["clamp_max"], f["fp32"])
    spad[f["spad_addr"]:f["spad_addr"] + n] = out


def _exec_eltwise(f: Mapping[str, int], spad: np.ndarray) -> None:
    a = spad[_strided_rows(f["a_addr"], f["a_stride_outer"], f["a_stride_inner"],
                           f["n_outer"], f["n_inner"])]
    b = spad[_strided_rows(f["b_addr"], f["b_stride_outer"], f["b_stride_inner"],
                           f["n_outer"], f["n_inner"])]
    if f["func"] == EltFunc.ADD:
        out = numerics.eltwise_add(a, b, f["a_zero"], f["b_zero"], f["a_mult"], f["b_mult"],
                                   f["shift"], f["zero_point"], f["clamp_min"], f["clamp_max"])
    else:
        out = numerics.eltwise_max(a, b, f["clamp_min"], f["clamp_max"])
    # The destination coincides with an operand element for element or misses it (checked at
    # dispatch), so reading everything first equals the element-by-element order.
    spad[f["dst"]:f["dst"] + len(out)] = out


def _exec_store(f: Mapping[str, int], dram: np.ndarray, spad: np.ndarray,
                acc: np.ndarray) -> None:
    mem = _local(f["mem"], spad, acc)
    rb = f["row_bytes"]
    for o in range(f["n_outer"]):
        for i in range(f["n_inner"]):          # later rows win where DRAM runs overlap
            row = f["src"] + o * f["src_stride_outer"] + i
            dst = f["dram_addr"] + o * f["dram_stride_outer"] + i * f["dram_stride_inner"]
            dram[dst:dst + rb] = mem[row, :rb]


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------

class _Machine:
    """State of one run; :meth:`run` steps it to HALT or to a fault."""

    def __init__(self, program: Program, dram: np.ndarray, spad: np.ndarray, acc: np.ndarray,
                 limit: int, skip_idle: bool) -> None:
        self.program = program
        self.cfg = cfg = program.config
        self.dram, self.spad, self.acc = dram, spad, acc
        self.limit = limit
        self.skip_idle = skip_idle
        n = program.n_instructions
        self.n = n
        self.trace = Trace.empty(n)
        self.decoded: dict[int, Instr] = {}
        self.timings: dict[int, tuple[int, int, int]] = {}   # index -> (unit, busy, latency)
        self.last_unsat: dict[int, list[Stall]] = {}   # head -> conditions unmet when last looked
        # Engines: queued (dispatched, not started) and in flight (started, not retired).
        self.queue: list[deque[int]] = [deque() for _ in _ENGINES]
        self.inflight: list[deque[int]] = [deque() for _ in _ENGINES]
        self.last_start = [-1] * len(_ENGINES)
        self.tok = [[0] * len(_ENGINES) for _ in _ENGINES]    # tok[src][dst]
        self.unit_free = [0] * len(Unit)
        # Array: two weight banks, the active one, when each bank's last MATMUL completes,
        # and the completion of the latest PRELOAD.
        self.weights = np.zeros((2, cfg.rows, cfg.cols), dtype=np.int8)
        self.active = 0
        self.bank_free = [0, 0]
        self.preload_c = 0
        self.vx_c = 0                  # latest completion of the instructions started on VX
        # Dispatcher.
        self.pc = 0
        self.halt_cycle = -1

    # Helpers -------------------------------------------------------------------------------
    def _instr(self, index: int) -> Instr:
        return self.decoded[index]

    def _pending(self) -> list[int]:
        """Dispatched instructions not yet retired."""
        return [i for q in self.queue for i in q] + [i for q in self.inflight for i in q]

    def _fault(self, code: Fault, cycle: int, index: int, detail: str) -> NPUFault:
        return NPUFault(code, cycle, index, detail)

    # Phase 1 -------------------------------------------------------------------------------
    def _retire(self, t: int) -> bool:
        did = False
        for e in _ENGINES:
            fifo = self.inflight[e]
            if fifo and self.trace.complete[fifo[0]] <= t:
                idx = fifo.popleft()
                self.trace.retire[idx] = t
                did = True
                for dst in _bits(self._instr(idx).signal):
                    if self.tok[e][dst] + 1 > self.cfg.token_max:
                        raise self._fault(Fault.TOKEN_OVERFLOW, t, idx,
                                          f"token counter {e.name}->{Engine(dst).name} would "
                                          f"exceed token_max={self.cfg.token_max}")
                    self.tok[e][dst] += 1
        return did

    # Phase 2 -------------------------------------------------------------------------------
    def _unmet(self, e: Engine, idx: int, t: int) -> list[Stall]:
        """The start conditions the head ``idx`` of engine ``e`` does not meet at ``t``,
        in Stall order."""
        ins = self._instr(idx)
        unit, _, _ = self.timings[idx]
        unmet = []
        if unit != Unit.NONE and t < self.unit_free[unit]:
            unmet.append(Stall.UNIT)
        if any(self.tok[src][e] < 1 for src in _bits(ins.wait)):
            unmet.append(Stall.TOKEN)
        if ins.opcode == Opcode.PRELOAD and t < self.bank_free[1 - self.active]:
            unmet.append(Stall.BANK)
        if ins.opcode == Opcode.MATMUL and ins.fields["swap"] and t < self.preload_c:
            unmet.append(Stall.PRELOAD)
        if len(self.inflight[e]) >= self.cfg.retire_depth:
            unmet.append(Stall.RETIRE)
        if ins.opcode == Opcode.ELTWISE and t < self.vx_c:
            unmet.append(Stall.HAZARD)
        return unmet

    def _start(self, e: Engine, idx: int, t: int) -> None:
        ins = self._instr(idx)
        f = ins.fields
        unit, busy, latency = self.timings[idx]
        tr = self.trace
        self.queue[e].popleft()
        tr.ready[idx] = max(tr.dispatch[idx] + 1, self.last_start[e] + 1)
        tr.start[idx] = t
        tr.complete[idx] = c = t + latency
        unmet = self.last_unsat.pop(idx, [])
        tr.stall[idx] = int(min(unmet)) if t > tr.ready[idx] and unmet else int(Stall.NONE)
        self.last_start[e] = t
        self.inflight[e].append(idx)
        if unit != Unit.NONE:
            self.unit_free[unit] = t + busy
        for src in _bits(ins.wait):
            self.tok[src][e] -= 1
        if e == Engine.VX:
            self.vx_c = max(self.vx_c, c)  # a SYNC may complete before an earlier VECTOR
        op = ins.opcode
        if op == Opcode.LOAD:
            _exec_load(f, self.dram, self.spad, self.acc)
        elif op == Opcode.GATHER:
            _exec_gather(f, self.dram, self.spad, self.acc, t, idx)
        elif op == Opcode.PRELOAD:
            self.weights[1 - self.active] = self.spad[f["spad_addr"]:
                                                      f["spad_addr"] + self.cfg.rows]
            self.preload_c = c
        elif op == Opcode.MATMUL:
            if f["swap"]:
                self.active = 1 - self.active
            self.bank_free[self.active] = max(self.bank_free[self.active], c)
            _exec_matmul(f, self.spad, self.acc, self.weights[self.active])
        elif op == Opcode.VECTOR:
            _exec_vector(f, self.spad, self.acc)
        elif op == Opcode.ELTWISE:
            _exec_eltwise(f, self.spad)
        elif op == Opcode.STORE:
            _exec_store(f, self.dram, self.spad, self.acc)
        # SYNC: tokens only.

    def _start_phase(self, t: int) -> bool:
        did = False
        for e in _ENGINES:
            if not self.queue[e]:
                continue
            idx = self.queue[e][0]
            if self.trace.dispatch[idx] > t - 1:
                continue
            unmet = self._unmet(e, idx, t)
            if unmet:
                self.last_unsat[idx] = unmet
            else:
                self._start(e, idx, t)
                did = True
        return did

    # Phase 3 -------------------------------------------------------------------------------
    def _dispatch(self, t: int) -> bool:
        if self.halt_cycle >= 0:
            return False
        pc = self.pc
        if pc >= self.n:
            raise self._fault(Fault.ILLEGAL_INSTRUCTION, t, pc,
                              f"the program counter ran past the last instruction ({self.n}) "
                              f"without HALT")
        if pc not in self.decoded:
            word = np.ascontiguousarray(self.program.instructions[pc]).astype("<u8").tobytes()
            try:
                ins = decode(word)
            except ISAError as exc:
                raise self._fault(Fault.ILLEGAL_INSTRUCTION, t, pc, str(exc)) from None
            why = address_error(ins, self.cfg, self.program.dram_bytes)
            if why:
                raise self._fault(Fault.ADDRESS_OUT_OF_RANGE, t, pc, why)
            self.decoded[pc] = ins
            tm = timing(ins, self.cfg)
            self.timings[pc] = (int(tm.unit), tm.busy, tm.latency)
        ins = self.decoded[pc]
        tr = self.trace
        if ins.opcode in (Opcode.HALT, Opcode.BARRIER):
            if ins.opcode == Opcode.BARRIER and self._pending():
                return False                        # waits for every earlier instruction
            # Recorded as taking one cycle at the dispatcher: s = d, c = r = d + 1.
            tr.dispatch[pc] = tr.ready[pc] = tr.start[pc] = t
            tr.complete[pc] = tr.retire[pc] = t + 1
            if ins.opcode == Opcode.HALT:
                self.halt_cycle = t
        else:
            e = ins.engine
            if len(self.queue[e]) >= self.cfg.queue_depth:
                return False                        # queue full: dispatch stalls
            self.queue[e].append(pc)
            tr.dispatch[pc] = t
            tr.engine[pc] = int(e)
        self.pc += 1
        return True

    # Idle-cycle skipping ---------------------------------------------------------------------
    def _next_event(self, t: int) -> int:
        """The first cycle after an idle cycle ``t`` at which some time threshold is reached.

        Between ``t`` and it nothing retires (every oldest in-flight completion is later),
        no token or queue changes, and every start condition of every queue head is unchanged,
        so those cycles are copies of ``t``."""
        times = [self.limit]
        for e in _ENGINES:
            if self.inflight[e]:
                times.append(int(self.trace.complete[self.inflight[e][0]]))
            if self.queue[e]:
                idx = self.queue[e][0]
                ins = self._instr(idx)
                unit = self.timings[idx][0]
                if unit != Unit.NONE:
                    times.append(self.unit_free[unit])
                if ins.opcode == Opcode.PRELOAD:
                    times.append(self.bank_free[1 - self.active])
                if ins.opcode == Opcode.MATMUL:
                    times.append(self.preload_c)
                if ins.opcode == Opcode.ELTWISE:
                    times.append(self.vx_c)
        later = [x for x in times if x > t]
        return min(later) if later else t + 1

    # Main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Run to the end; returns the total cycle count or raises NPUFault."""
        t = 0
        while True:
            did = self._retire(t)
            if self.halt_cycle >= 0 and not self._pending():
                return t                            # = max(r, halt dispatch + 1)
            if t >= self.limit:
                pending = self._pending()
                raise self._fault(Fault.WATCHDOG, self.limit,
                                  min(pending) if pending else self.pc,
                                  f"cycle limit {self.limit} reached")
            did |= self._start_phase(t)
            did |= self._dispatch(t)
            if not did and not any(self.inflight):
                queued = [i for q in self.queue for i in q]
                raise self._fault(Fault.TOKEN_DEADLOCK, t, min(queued) if queued else self.pc,
                                  "no instruction can ever start: tokens are missing")
            t = self._next_event(t) if (self.skip_idle and not did) else t + 1


def run_reference(program: Program, inputs: Mapping[str, object] | None = None, *,
                  watchdog: int | None = None, validate: bool = True,
                  skip_idle: bool = True) -> RunResult:
    """Execute ``program`` on the reference interpreter.

    ``inputs`` maps input binding names to arrays (see :func:`npu.runtime.io.initial_state`).
    ``watchdog`` is the cycle limit (default: the config's ``watchdog_cycles``). With
    ``validate=False`` the program is not checked at load, so illegal instructions and static
    address errors surface as faults at dispatch. ``skip_idle=False`` steps through every
    cycle instead of jumping over idle ones (same result, for testing).

    Returns a :class:`RunResult`; raises :class:`NPUFault` (code, cycle, index) on a fault.
    """
    if validate:
        program.validate()
    limit = program.config.watchdog_cycles if watchdog is None else watchdog
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"watchdog must be a positive number of cycles, got {watchdog!r}")
    dram, spad, acc = initial_state(program, inputs)
    machine = _Machine(program, dram, spad, acc, int(limit), skip_idle)
    cycles = machine.run()
    return RunResult(program=program, cycles=cycles, dram=dram, spad=spad, acc=acc,
                     trace=machine.trace, extra={"executor": "reference"})
