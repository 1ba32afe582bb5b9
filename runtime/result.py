"""What an execution returns: memories, per-instruction timing, and faults.

Both executors (the numpy reference interpreter and the numba engine) return a
:class:`RunResult` and raise :class:`NPUFault`; the differential tests compare them field by field.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from npu.isa import Fault
from npu.program import Binding, Program


class NPUFault(Exception):
    """A machine fault: the same code, cycle and instruction index as the RTL's status register."""

    def __init__(self, code: Fault | int, cycle: int, index: int, detail: str = "") -> None:
        self.code = Fault(code)
        self.cycle = int(cycle)
        self.index = int(index)
        self.detail = detail
        msg = f"{self.code.name} at cycle {self.cycle}, instruction {self.index}"
        super().__init__(f"{msg}: {detail}" if detail else msg)

    def key(self) -> tuple[int, int, int]:
        """(code, cycle, index): what conformance compares."""
        return int(self.code), self.cycle, self.index


class Stall(enum.IntEnum):
    """Why an instruction at the head of its queue started later than it could have.

    The reason recorded is the constraint that was satisfied last (ties: the lowest value)."""

    NONE = 0
    UNIT = 1        # its unit was still busy with an earlier instruction
    TOKEN = 2       # waiting for a dependency token
    BANK = 3        # PRELOAD: the weight bank it overwrites is still in use
    PRELOAD = 4     # MATMUL with swap: the preload it swaps in has not completed
    RETIRE = 5      # retire_depth instructions of its engine in flight
    HAZARD = 6      # ELTWISE: the previous VX instruction has not completed


@dataclass
class Trace:
    """Per-instruction cycles (int64 arrays of length N; -1 where the instruction never got
    there, e.g. after a fault). ``ready`` is the cycle the instruction was at its queue head
    and dispatched (could have started if nothing else held it)."""

    dispatch: np.ndarray
    ready: np.ndarray
    start: np.ndarray
    complete: np.ndarray
    retire: np.ndarray
    stall: np.ndarray      # Stall code per instruction
    engine: np.ndarray     # Engine per instruction (-1 for BARRIER/HALT)

    @classmethod
    def empty(cls, n: int) -> Trace:
        def minus() -> np.ndarray:
            return np.full(n, -1, dtype=np.int64)
        return cls(minus(), minus(), minus(), minus(), minus(), np.zeros(n, dtype=np.int64),
                   minus())

    def equal(self, other: Trace) -> bool:
        return all(np.array_equal(getattr(self, k), getattr(other, k))
                   for k in ("dispatch", "ready", "start", "complete", "retire", "stall",
                             "engine"))


@dataclass
class RunResult:
    """Final state of a run that ended with HALT."""

    program: Program
    cycles: int                   # total cycles (see docs/architecture.md)
    dram: np.ndarray              # uint8 [dram_bytes]
    spad: np.ndarray              # int8 [spad_rows, cols]
    acc: np.ndarray               # int32 [acc_rows, cols]
    trace: Trace
    extra: dict = field(default_factory=dict)

    def read(self, binding: Binding) -> np.ndarray:
        """The tensor a binding describes, read from final DRAM."""
        raw = self.dram[binding.addr:binding.addr + binding.nbytes]
        return raw.view(np.dtype(binding.dtype).newbyteorder("<")).reshape(binding.shape).copy()

    def outputs(self) -> dict[str, np.ndarray]:
        """Every output binding of the program, by name."""
        return {b.name: self.read(b) for b in self.program.outputs}
