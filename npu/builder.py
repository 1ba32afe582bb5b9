"""ProgramBuilder: emit instructions, allocate SPAD/ACC/DRAM, wire tokens, label regions.

Used by the examples, the tests and the compiler's emit pass::

    b = ProgramBuilder("npu16")
    a = b.input("a", (64, 16), "int8")           # DRAM binding
    w = b.segment("w", weights)                  # constant in DRAM
    sp = b.alloc_spad(64)
    b.region("layer0")
    b.load(dram_addr=a.addr, dst=sp, n_inner=64, row_bytes=16, dram_stride_inner=16,
           signal="EX")
    ...
    b.halt()
    program = b.build()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npu.isa import Engine, Instr, ISAError, NPUConfig, Opcode, encode_words, get_config
from npu.program import Binding, Program, ProgramError, Segment, label_region

__all__ = ["ProgramBuilder", "engine_mask", "DEFAULTS"]

#: Values of fields left out by the builder's per-opcode methods and by the assembler
#: (``npu.asm``); every other field left out is 0. ``emit`` applies no defaults.
DEFAULTS: dict[Opcode, dict[str, int]] = {
    Opcode.LOAD: {"n_outer": 1},
    Opcode.MATMUL: {"n_outer": 1, "spad_stride_inner": 1},
    Opcode.VECTOR: {"clamp_min": -128, "clamp_max": 127},
    Opcode.ELTWISE: {"n_outer": 1, "a_stride_inner": 1, "b_stride_inner": 1,
                     "clamp_min": -128, "clamp_max": 127},
    Opcode.STORE: {"n_outer": 1},
}

EngineSpec = "str | Engine | Iterable[str | Engine] | None"


def engine_mask(spec: Any) -> int:
    """Token mask from engine names/enums: ``"EX"``, ``("LD", "VX")``, ``Engine.ST`` or None."""
    if spec is None or spec == ():
        return 0
    if isinstance(spec, (str, Engine, int)):
        spec = (spec,)
    mask = 0
    for e in spec:
        try:
            eng = Engine[e.upper()] if isinstance(e, str) else Engine(e)
        except (KeyError, ValueError):
            raise ISAError(f"unknown engine {e!r}; engines are {[x.name for x in Engine]}"
                           ) from None
        mask |= 1 << eng
    return mask


class _Bump:
    """A bump allocator with marks, for SPAD/ACC rows and DRAM bytes."""

    def __init__(self, what: str, size: int | None) -> None:
        self.what, self.size, self.top, self.peak = what, size, 0, 0

    def alloc(self, n: int, align: int = 1) -> int:
        if n < 1:
            raise ValueError(f"cannot allocate {n} {self.what}")
        start = -(-self.top // align) * align
        if self.size is not None and start + n > self.size:
            raise ProgramError(f"out of {self.what}: need {n} at {start}, capacity {self.size}")
        self.top = start + n
        self.peak = max(self.peak, self.top)
        return start


class ProgramBuilder:
    """Builds a :class:`npu.program.Program` for one config."""

    def __init__(self, config: str | NPUConfig = "npu16", dram_bytes: int | None = None):
        self.config = get_config(config)
        self._instrs: list[Instr] = []
        self.spad = _Bump("SPAD rows", self.config.spad_rows)
        self.acc = _Bump("ACC rows", self.config.acc_rows)
        self.dram = _Bump("DRAM bytes", dram_bytes)
        self._dram_bytes = dram_bytes
        self.segments: list[Segment] = []
        self.inputs: list[Binding] = []
        self.outputs: list[Binding] = []
        self.regions: list[tuple[int, str]] = []

    # Allocation ------------------------------------------------------------------------------
    def alloc_spad(self, rows: int) -> int:
        """Reserve ``rows`` SPAD rows; returns the first row."""
        return self.spad.alloc(rows)

    def alloc_acc(self, rows: int) -> int:
        """Reserve ``rows`` ACC rows; returns the first row."""
        return self.acc.alloc(rows)

    def alloc_dram(self, nbytes: int, align: int = 64) -> int:
        """Reserve ``nbytes`` of DRAM; returns the byte address."""
        return self.dram.alloc(nbytes, align)

    def segment(self, name: str, data: np.ndarray | bytes, addr: int | None = None) -> int:
        """Place constant data (weights, parameters, indices) in DRAM; returns its address.
        Arrays are stored in C order, little endian."""
        raw = data if isinstance(data, (bytes, bytearray)) else \
            np.ascontiguousarray(data).astype(np.asarray(data).dtype.newbyteorder("<")).tobytes()
        if addr is None:
            addr = self.alloc_dram(len(raw))
        self.segments.append(Segment(name, int(addr), bytes(raw)))
        return int(addr)

    def _binding(self, name: str, shape: tuple[int, ...], dtype: str, addr: int | None,
                 **kw: Any) -> Binding:
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if addr is None:
            addr = self.alloc_dram(nbytes)
        return Binding(name, int(addr), shape, dtype, **kw)

    def input(self, name: str, shape: tuple[int, ...], dtype: str = "int8",
              addr: int | None = None, **kw: Any) -> Binding:
        """Declare an input tensor in DRAM (allocated unless ``addr`` is given)."""
        b = self._binding(name, shape, dtype, addr, **kw)
        self.inputs.append(b)
        return b

    def output(self, name: str, shape: tuple[int, ...], dtype: str = "int8",
               addr: int | None = None, **kw: Any) -> Binding:
        """Declare an output tensor in DRAM (allocated unless ``addr`` is given)."""
        b = self._binding(name, shape, dtype, addr, **kw)
        self.outputs.append(b)
        return b

    # Emission --------------------------------------------------------------------------------
    def region(self, label: str) -> None:
        """Label the instructions emitted from now on (e.g. a layer name) for the profile."""
        label_region(self.regions, len(self._instrs), label)

    def emit(self, opcode: Opcode, *, wait: Any = None, signal: Any = None, **fields: int) -> int:
        """Append one instruction; returns its index. Field errors raise ISAError."""
        ins = Instr(opcode, engine_mask(wait), engine_mask(signal),
                    {k: int(v) for k, v in fields.items()})
        self._instrs.append(ins)
        return len(self._instrs) - 1

    def load(self, **kw: Any) -> int:
        """LOAD (LD): 2-D strided DRAM -> SPAD/ACC copy, or fill."""
        return self.emit(Opcode.LOAD, **{**DEFAULTS[Opcode.LOAD], **kw})

    def gather(self, **kw: Any) -> int:
        """GATHER (LD): DRAM rows selected by an int32 index list."""
        return self.emit(Opcode.GATHER, **kw)

    def preload(self, spad_addr: int, **kw: Any) -> int:
        """PRELOAD (EX): SPAD weight tile -> the shadow weight bank."""
        return self.emit(Opcode.PRELOAD, spad_addr=spad_addr, **kw)

    def matmul(self, **kw: Any) -> int:
        """MATMUL (EX): stream SPAD rows through the array into ACC."""
        return self.emit(Opcode.MATMUL, **{**DEFAULTS[Opcode.MATMUL], **kw})

    def vector(self, *, fp32: int = 0, **kw: Any) -> int:
        """VECTOR (VX): requantize ACC rows into SPAD. ``fp32=1``: the multiplier row holds
        float32 scales as bit patterns (:func:`npu.numerics.f32_bits`), applied as
        onnxruntime does, and the shift row is ignored (:func:`npu.numerics.requantize`)."""
        return self.emit(Opcode.VECTOR, **{**DEFAULTS[Opcode.VECTOR], **kw}, fp32=fp32)

    def eltwise(self, **kw: Any) -> int:
        """ELTWISE (VX): rescaled ADD or MAX of SPAD rows."""
        return self.emit(Opcode.ELTWISE, **{**DEFAULTS[Opcode.ELTWISE], **kw})

    def store(self, **kw: Any) -> int:
        """STORE (ST): 2-D strided SPAD/ACC -> DRAM copy."""
        return self.emit(Opcode.STORE, **{**DEFAULTS[Opcode.STORE], **kw})

    def sync(self, engine: str | Engine, **kw: Any) -> int:
        """SYNC on ``engine``: move tokens only."""
        eng = Engine[engine.upper()] if isinstance(engine, str) else Engine(engine)
        return self.emit(Opcode.SYNC, engine=int(eng), **kw)

    def barrier(self) -> int:
        """BARRIER: everything before retires before anything after is dispatched."""
        return self.emit(Opcode.BARRIER)

    def halt(self) -> int:
        """HALT: end of program."""
        return self.emit(Opcode.HALT)

    @property
    def instructions(self) -> list[Instr]:
        return list(self._instrs)

    def build(self, metadata: dict[str, Any] | None = None, validate: bool = True) -> Program:
        """The finished program (HALT appended if missing), validated unless told otherwise."""
        if not self._instrs or self._instrs[-1].opcode != Opcode.HALT:
            self.halt()
        dram_bytes = self._dram_bytes
        if dram_bytes is None:
            dram_bytes = max(64, -(-self.dram.peak // 64) * 64)
        meta = {"spad_rows_used": self.spad.peak, "acc_rows_used": self.acc.peak}
        meta.update(metadata or {})
        prog = Program(self.config, encode_words(self._instrs), dram_bytes, list(self.segments),
                       list(self.inputs), list(self.outputs), list(self.regions), meta)
        if validate:
            prog.validate()
        return prog
