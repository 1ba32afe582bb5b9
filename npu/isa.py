"""The NPU instruction set: the one definition of every fact hw, compiler, runtime and docs share.

This module holds, once each:

* :class:`NPUConfig`, the frozen object that sizes everything (presets ``npu4`` .. ``npu128``);
* the engines, opcodes, memories, fault codes;
* the bit layout of every instruction (fixed 256-bit words, fields never cross a 64-bit word),
  from which :func:`encode`, :func:`decode`, range checks, the numba shift/mask tables and the
  Amaranth layouts of ``npu.hw`` are all derived;
* the timing contract: each instruction's unit, busy cycles and latency as formulas that are
  evaluated here (for the runtime and the RTL tests) and printed verbatim in
  ``docs/architecture.md``;
* the static address footprint of every instruction (used by program validation and by the
  runtime's dispatch-time address fault).

It imports only numpy and the standard library so every layer can import it cheaply.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = [
    "INSTR_BITS", "INSTR_BYTES", "INSTR_WORDS", "Engine", "Opcode", "Mem", "EltFunc", "Fault",
    "Unit", "NPUConfig", "PRESETS", "get_config", "Field", "LAYOUTS", "OPCODE_ENGINE",
    "OPCODE_UNIT", "Instr", "ISAError", "encode", "decode", "encode_words", "decode_words",
    "Timing", "TIMING", "timing", "timing_arrays", "footprint", "address_error",
    "VECTOR_PARAM_ROWS", "instruction_table_markdown", "field_arrays", "field_matrix",
    "static_faults",
]

INSTR_BITS = 256
INSTR_WORDS = INSTR_BITS // 64
INSTR_BYTES = INSTR_BITS // 8
#: VECTOR reads this many ACC rows of per-channel parameters: bias, multiplier, shift.
VECTOR_PARAM_ROWS = 3


class ISAError(ValueError):
    """An instruction or configuration that the ISA cannot express; the message names the field."""


class Engine(enum.IntEnum):
    """The four engines, in pipeline order. Token masks use bit ``1 << engine``."""

    LD = 0
    EX = 1
    VX = 2
    ST = 3


class Unit(enum.IntEnum):
    """Functional units. An engine starts at most one instruction per cycle, in order, and each
    instruction then occupies its unit for its busy cycles. EX has two units, so a PRELOAD of the
    next weight tile runs beside the MATMUL streaming rows through the array."""

    LD_DMA = 0
    EX_WEIGHTS = 1
    EX_ARRAY = 2
    VX = 3
    ST_DMA = 4
    NONE = 5  # SYNC: no unit, one cycle


class Opcode(enum.IntEnum):
    """Instruction opcodes (4 bits). 0 and 11..15 are illegal so that zeroed memory faults."""

    LOAD = 1
    GATHER = 2
    PRELOAD = 3
    MATMUL = 4
    VECTOR = 5
    ELTWISE = 6
    STORE = 7
    SYNC = 8
    BARRIER = 9
    HALT = 10


class Mem(enum.IntEnum):
    """On-chip memory selected by LOAD/GATHER destinations and STORE sources."""

    SPAD = 0
    ACC = 1


class EltFunc(enum.IntEnum):
    """ELTWISE functions."""

    ADD = 0
    MAX = 1


class Fault(enum.IntEnum):
    """Machine fault codes, identical in the RTL status register and in ``NPUFault.code``."""

    NONE = 0
    ILLEGAL_INSTRUCTION = 1
    ADDRESS_OUT_OF_RANGE = 2
    TOKEN_DEADLOCK = 3
    WATCHDOG = 4
    TOKEN_OVERFLOW = 5


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NPUConfig:
    """Every size of the machine. Frozen; round-trips through JSON; validated on construction."""

    name: str = "npu16"
    rows: int = 16                 # array rows = reduction (K) lanes = SPAD row bytes
    cols: int = 16                 # array columns = output channels per tile = ACC row lanes
    spad_rows: int = 16384         # scratchpad rows of `cols` int8 bytes
    acc_rows: int = 1024           # accumulator rows of `cols` int32 lanes
    queue_depth: int = 8           # entries of each engine's in-order instruction queue
    retire_depth: int = 32         # started-but-not-retired instructions per engine
    token_max: int = 255           # largest value of a dependency-token counter
    dram_latency: int = 32         # cycles from a DRAM request to its data / write ack
    dram_beat_bytes: int = 16      # bytes per cycle on each of the DRAM read and write channels
    vx_depth: int = 4              # vector unit pipeline depth
    gather_max: int = 256          # most rows one GATHER may fetch (size of its index buffer)
    imem_depth: int = 65536        # instruction memory entries in the RTL
    watchdog_cycles: int = 1 << 40  # default cycle limit before a WATCHDOG fault

    def __post_init__(self) -> None:
        positive = ("rows", "cols", "spad_rows", "acc_rows", "queue_depth", "retire_depth",
                    "token_max", "dram_latency", "dram_beat_bytes", "vx_depth", "gather_max",
                    "imem_depth", "watchdog_cycles")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ISAError(f"NPUConfig.{key} must be a positive integer, got {value!r}")
        if self.rows != self.cols:
            raise ISAError(f"NPUConfig: only square arrays are supported (rows={self.rows}, "
                           f"cols={self.cols}): SPAD rows feed both the array rows and columns")
        if self.rows & (self.rows - 1):
            raise ISAError(f"NPUConfig.rows must be a power of two, got {self.rows}")
        for key, limit in (("spad_rows", 1 << 20), ("acc_rows", 1 << 20),
                           ("gather_max", 1 << 16), ("imem_depth", 1 << 24),
                           ("queue_depth", 256), ("retire_depth", 256), ("token_max", 1 << 16)):
            if getattr(self, key) > limit:
                raise ISAError(f"NPUConfig.{key}={getattr(self, key)} exceeds the encodable "
                               f"limit {limit}")
        if self.dram_beat_bytes & (self.dram_beat_bytes - 1):
            raise ISAError(f"NPUConfig.dram_beat_bytes must be a power of two, "
                           f"got {self.dram_beat_bytes}")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def pes(self) -> int:
        """Processing elements in the array."""
        return self.rows * self.cols

    @property
    def spad_row_bytes(self) -> int:
        return self.cols

    @property
    def acc_row_bytes(self) -> int:
        return 4 * self.cols

    @property
    def spad_bytes(self) -> int:
        return self.spad_rows * self.spad_row_bytes

    @property
    def acc_bytes(self) -> int:
        return self.acc_rows * self.acc_row_bytes

    def mem_rows(self, mem: int) -> int:
        return self.spad_rows if mem == Mem.SPAD else self.acc_rows

    def mem_row_bytes(self, mem: int) -> int:
        return self.spad_row_bytes if mem == Mem.SPAD else self.acc_row_bytes

    # JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NPUConfig:
        if not isinstance(data, Mapping):
            raise ISAError(f"NPUConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ISAError(f"NPUConfig: unknown field(s) {unknown}")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> NPUConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ISAError(f"NPUConfig JSON is malformed: {exc}") from exc
        return cls.from_dict(data)


def _preset(name: str, dim: int, spad_rows: int, acc_rows: int, beat: int) -> NPUConfig:
    return NPUConfig(name=name, rows=dim, cols=dim, spad_rows=spad_rows, acc_rows=acc_rows,
                     dram_beat_bytes=beat)


PRESETS: dict[str, NPUConfig] = {
    "npu4": _preset("npu4", 4, 4096, 256, 4),            # 16 KiB SPAD, 4 KiB ACC: fast RTL tests
    "npu8": _preset("npu8", 8, 8192, 512, 8),            # 64 KiB SPAD, 16 KiB ACC
    "npu16": _preset("npu16", 16, 16384, 1024, 16),      # 256 KiB SPAD, 64 KiB ACC (default)
    "npu32": _preset("npu32", 32, 16384, 1024, 32),      # 512 KiB SPAD, 128 KiB ACC
    "npu128": _preset("npu128", 128, 16384, 2048, 64),   # 2 MiB SPAD, 1 MiB ACC
}


def get_config(config: str | NPUConfig | Mapping[str, Any] | None = None) -> NPUConfig:
    """Return a config from a preset name, a JSON file path, a mapping, or a config."""
    if config is None:
        return PRESETS["npu16"]
    if isinstance(config, NPUConfig):
        return config
    if isinstance(config, Mapping):
        return NPUConfig.from_dict(config)
    if isinstance(config, str):
        if config in PRESETS:
            return PRESETS[config]
        if config.endswith(".json"):
            try:
                with open(config, encoding="utf-8") as fh:
                    return NPUConfig.from_json(fh.read())
            except OSError as exc:
                raise ISAError(f"cannot read config file {config!r}: {exc}") from exc
        raise ISAError(f"unknown config {config!r}; presets are {sorted(PRESETS)} "
                       f"or a path to a .json file")
    raise ISAError(f"config must be a preset name, path, mapping or NPUConfig, got {config!r}")


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One bit field: position in the 256-bit word, width, signedness and meaning."""

    name: str
    width: int
    signed: bool = False
    doc: str = ""
    lsb: int = -1  # filled in by the layout pass
    maximum: int | None = None  # largest legal value when below the width's (enumerations)

    @property
    def lo(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        if self.maximum is not None:
            return self.maximum
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1


# Header common to every instruction. `wait`/`signal` are engine masks (bit 1 << Engine).
_HEADER = [
    Field("opcode", 4, doc="Opcode"),
    Field("wait", 4, doc="engines to take one token from before starting"),
    Field("signal", 4, doc="engines to give one token to on retirement"),
]

_ROW = 20  # SPAD/ACC row address width: up to 1M rows

_BODIES: dict[Opcode, list[Field]] = {
    Opcode.LOAD: [
        Field("dram_addr", 32, doc="DRAM byte address of the first row (ignored when fill=1)"),
        Field("dram_stride_outer", 32, doc="DRAM bytes between outer runs"),
        Field("dram_stride_inner", 24, doc="DRAM bytes between rows of a run"),
        Field("dst", _ROW, doc="first destination row"),
        Field("dst_stride_outer", _ROW, doc="destination rows between outer runs"),
        Field("n_inner", 16, doc="rows per run (>=1)"),
        Field("n_outer", 16, doc="runs (>=1)"),
        Field("row_bytes", 12, doc="bytes per row (>=1); the rest of each row is written 0"),
        Field("mem", 1, doc="destination memory: 0 SPAD (int8), 1 ACC (int32 little-endian)"),
        Field("fill", 1, doc="1: write fill_value to every byte instead of reading DRAM"),
        Field("fill_value", 8, signed=True, doc="byte written when fill=1"),
    ],
    Opcode.GATHER: [
        Field("dram_addr", 32, doc="DRAM byte address of row 0 of the table"),
        Field("index_addr", 32, doc="DRAM byte address of n int32 row indices"),
        Field("row_stride", 24, doc="DRAM bytes between table rows"),
        Field("dst", _ROW, doc="first destination row"),
        Field("n", 16, doc="rows to fetch (1..gather_max)"),
        Field("row_bytes", 12, doc="bytes per row (>=1); the rest of each row is written 0"),
        Field("mem", 1, doc="destination memory: 0 SPAD, 1 ACC"),
    ],
    Opcode.PRELOAD: [
        Field("spad_addr", _ROW, doc="first of `rows` SPAD rows holding the weight tile "
                                      "(row k = weights of input lane k for every column)"),
    ],
    Opcode.MATMUL: [
        Field("spad_addr", _ROW, doc="SPAD row of the first input vector"),
        Field("spad_stride_outer", _ROW, doc="SPAD rows between outer runs"),
        Field("spad_stride_inner", 16, doc="SPAD rows between inputs of a run"),
        Field("acc_addr", _ROW, doc="first ACC row written (rows are contiguous)"),
        Field("n_inner", 16, doc="inputs per run (>=1)"),
        Field("n_outer", 16, doc="runs (>=1)"),
        Field("accumulate", 1, doc="1: ACC += result, 0: ACC = result"),
        Field("swap", 1, doc="1: make the preloaded weights active first"),
    ],
    Opcode.VECTOR: [
        Field("acc_addr", _ROW, doc="first ACC row read"),
        Field("spad_addr", _ROW, doc="first SPAD row written"),
        Field("param_addr", _ROW, doc="ACC rows with per-lane bias, multiplier, shift"),
        Field("n", 16, doc="rows (>=1)"),
        Field("zero_point", 8, signed=True, doc="output zero point"),
        Field("clamp_min", 8, signed=True, doc="lower clamp (ReLU: the zero point)"),
        Field("clamp_max", 8, signed=True, doc="upper clamp"),
        Field("fp32", 1, doc="1: the multiplier row holds IEEE-754 binary32 scales, applied "
                             "as onnxruntime does (the shift row is ignored)"),
    ],
    Opcode.ELTWISE: [
        # Ordered to pack the four 64-bit words exactly: A operand, B operand + output
        # requantization, destination + counts + clamps, the four strides. The 23-bit
        # multipliers represent onnxruntime's float32 scale ratios finely enough that ADD
        # reproduces its QLinearAdd bit for bit (16 bits missed ~1 pair in 500).
        Field("func", 1, doc="0 ADD (rescaled), 1 MAX", maximum=max(EltFunc)),
        Field("a_addr", _ROW, doc="SPAD row of the first A operand"),
        Field("a_mult", 23, doc="ADD: multiplier of (A - a_zero), unsigned"),
        Field("a_zero", 8, signed=True, doc="ADD: zero point of A"),
        Field("b_addr", _ROW, doc="SPAD row of the first B operand"),
        Field("b_mult", 23, doc="ADD: multiplier of (B - b_zero), unsigned"),
        Field("b_zero", 8, signed=True, doc="ADD: zero point of B"),
        Field("shift", 5, doc="ADD: right shift (round half to even)"),
        Field("zero_point", 8, signed=True, doc="ADD: output zero point"),
        Field("dst", _ROW, doc="first SPAD row written (contiguous)"),
        Field("n_inner", 12, doc="rows per run (>=1)"),
        Field("n_outer", 12, doc="runs (>=1)"),
        Field("clamp_min", 8, signed=True, doc="lower clamp"),
        Field("clamp_max", 8, signed=True, doc="upper clamp"),
        Field("a_stride_outer", 16, doc="A rows between outer runs"),
        Field("b_stride_outer", 16, doc="B rows between outer runs"),
        Field("a_stride_inner", 16, doc="A rows between elements of a run"),
        Field("b_stride_inner", 16, doc="B rows between elements of a run"),
    ],
    Opcode.STORE: [
        Field("dram_addr", 32, doc="DRAM byte address of the first row"),
        Field("dram_stride_outer", 32, doc="DRAM bytes between outer runs"),
        Field("dram_stride_inner", 24, doc="DRAM bytes between rows of a run"),
        Field("src", _ROW, doc="first source row"),
        Field("src_stride_outer", _ROW, doc="source rows between outer runs"),
        Field("n_inner", 16, doc="rows per run (>=1)"),
        Field("n_outer", 16, doc="runs (>=1)"),
        Field("row_bytes", 12, doc="bytes written per row (>=1, <= the source row's bytes)"),
        Field("mem", 1, doc="source memory: 0 SPAD, 1 ACC"),
    ],
    Opcode.SYNC: [
        Field("engine", 2, doc="engine that executes it (0 LD, 1 EX, 2 VX, 3 ST)"),
    ],
    Opcode.BARRIER: [],
    Opcode.HALT: [],
}


def _lay_out(fields: list[Field]) -> dict[str, Field]:
    """Place fields LSB-first so that none crosses a 64-bit word boundary."""
    placed: dict[str, Field] = {}
    pos = 0
    for f in fields:
        if pos // 64 != (pos + f.width - 1) // 64:
            pos = (pos // 64 + 1) * 64
        placed[f.name] = dataclasses.replace(f, lsb=pos)
        pos += f.width
    if pos > INSTR_BITS:
        raise AssertionError(f"instruction layout needs {pos} bits > {INSTR_BITS}")
    return placed


#: Field layout of each opcode, header included, in encoding order.
LAYOUTS: dict[Opcode, dict[str, Field]] = {
    op: _lay_out(_HEADER + body) for op, body in _BODIES.items()
}

_HEADER_NAMES = ("opcode", "wait", "signal")
_OPCODES: dict[int, Opcode] = {int(op): op for op in Opcode}
_ZERO_FIELDS: dict[Opcode, dict[str, int]] = {
    op: {k: 0 for k in layout if k not in _HEADER_NAMES} for op, layout in LAYOUTS.items()}
_RANGES: dict[Opcode, list[tuple[str, int, int, Field]]] = {
    op: [(k, f.lo, f.hi, f) for k, f in layout.items() if k != "opcode"]
    for op, layout in LAYOUTS.items()}
_PACK: dict[Opcode, list[tuple[str, int, int]]] = {
    op: [(k, (1 << f.width) - 1, f.lsb) for k, f in layout.items() if k not in _HEADER_NAMES]
    for op, layout in LAYOUTS.items()}

OPCODE_ENGINE: dict[Opcode, Engine | None] = {
    Opcode.LOAD: Engine.LD, Opcode.GATHER: Engine.LD,
    Opcode.PRELOAD: Engine.EX, Opcode.MATMUL: Engine.EX,
    Opcode.VECTOR: Engine.VX, Opcode.ELTWISE: Engine.VX,
    Opcode.STORE: Engine.ST,
    Opcode.SYNC: None,  # its `engine` field says
    Opcode.BARRIER: None, Opcode.HALT: None,  # handled by the dispatcher
}

OPCODE_UNIT: dict[Opcode, Unit] = {
    Opcode.LOAD: Unit.LD_DMA, Opcode.GATHER: Unit.LD_DMA,
    Opcode.PRELOAD: Unit.EX_WEIGHTS, Opcode.MATMUL: Unit.EX_ARRAY,
    Opcode.VECTOR: Unit.VX, Opcode.ELTWISE: Unit.VX,
    Opcode.STORE: Unit.ST_DMA,
    Opcode.SYNC: Unit.NONE, Opcode.BARRIER: Unit.NONE, Opcode.HALT: Unit.NONE,
}


@dataclass(frozen=True)
class Instr:
    """A decoded instruction: opcode, token masks and named fields (missing fields are 0)."""

    opcode: Opcode
    wait: int = 0
    signal: int = 0
    fields: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Hot path of every emitter (the compiler makes 10^5-10^6 of these): precomputed
        # per-opcode tables, one pass over the given fields, one over the ranges.
        op = _OPCODES.get(self.opcode) if not isinstance(self.opcode, bool) else None
        if op is None:
            raise ISAError(f"illegal opcode {self.opcode!r}")
        object.__setattr__(self, "opcode", op)
        full = dict(_ZERO_FIELDS[op])
        for key, value in self.fields.items():
            if key not in full:
                layout = LAYOUTS[op]
                raise ISAError(f"{op.name} has no field(s) {sorted(set(self.fields) - set(full))}"
                               f"; fields are {[k for k in layout if k not in _HEADER_NAMES]}")
            if type(value) is not int:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise ISAError(f"{op.name}.{key} must be an integer, got {value!r}")
                value = int(value)
            full[key] = value
        object.__setattr__(self, "fields", full)
        for key in ("wait", "signal"):
            v = getattr(self, key)
            if type(v) is not int:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                    raise ISAError(f"{op.name}.{key} must be an integer, got {v!r}")
                object.__setattr__(self, key, int(v))
        for key, lo, hi, f in _RANGES[op]:
            v = full[key] if key in full else getattr(self, key)
            if v < lo or v > hi:
                raise ISAError(f"{op.name}.{key}={v} out of range [{f.lo}, {f.hi}] "
                               f"({f.width}-bit {'signed' if f.signed else 'unsigned'})")
        engine = self.engine
        for mask_name in ("wait", "signal"):
            mask = getattr(self, mask_name)
            if engine is None and mask:
                raise ISAError(f"{op.name} belongs to no engine and cannot {mask_name} on tokens")
            if engine is not None and mask & (1 << engine):
                raise ISAError(f"{op.name}.{mask_name} names its own engine {engine.name}")

    @property
    def engine(self) -> Engine | None:
        """Engine executing this instruction (None for BARRIER/HALT)."""
        if self.opcode == Opcode.SYNC:
            return Engine(self.fields["engine"])
        return OPCODE_ENGINE[self.opcode]

    def __getattr__(self, name: str) -> int:
        fields = object.__getattribute__(self, "fields")
        if name in fields:
            return fields[name]
        raise AttributeError(name)

    def encode(self) -> bytes:
        return encode(self)


def _to_words(value: int) -> list[int]:
    return [(value >> (64 * i)) & ((1 << 64) - 1) for i in range(INSTR_WORDS)]


def encode(instr: Instr) -> bytes:
    """Encode one instruction into 32 little-endian bytes."""
    return _encode_int(instr).to_bytes(INSTR_BYTES, "little")


def _encode_int(instr: Instr) -> int:
    word = int(instr.opcode) | (instr.wait << 4) | (instr.signal << 8)  # header, see _HEADER
    fields = instr.fields
    for key, mask, lsb in _PACK[instr.opcode]:
        word |= (fields[key] & mask) << lsb
    return word


def decode(data: bytes) -> Instr:
    """Decode 32 bytes into an :class:`Instr`; raises :class:`ISAError` when illegal.

    Bits outside the opcode's fields must be zero, so that encode(decode(b)) == b always.
    """
    if len(data) != INSTR_BYTES:
        raise ISAError(f"an instruction is {INSTR_BYTES} bytes, got {len(data)}")
    word = int.from_bytes(bytes(data), "little")
    opcode = word & 0xF
    try:
        op = Opcode(opcode)
    except ValueError:
        raise ISAError(f"illegal opcode {opcode}") from None
    layout = LAYOUTS[op]
    values: dict[str, int] = {}
    used = 0
    for key, f in layout.items():
        mask = (1 << f.width) - 1
        raw = (word >> f.lsb) & mask
        used |= mask << f.lsb
        if f.signed and raw >> (f.width - 1):
            raw -= 1 << f.width
        values[key] = raw
    if word & ~used:
        raise ISAError(f"{op.name}: reserved bits set (0x{word & ~used:x})")
    wait, signal = values.pop("wait"), values.pop("signal")
    values.pop("opcode")
    return Instr(op, wait, signal, values)


def encode_words(instrs: list[Instr]) -> np.ndarray:
    """Encode a program into an (N, 4) uint64 array (the in-memory and file representation)."""
    buf = b"".join(_encode_int(i).to_bytes(INSTR_BYTES, "little") for i in instrs)
    return np.frombuffer(buf, dtype="<u8").reshape(-1, INSTR_WORDS).astype(np.uint64)


def decode_words(words: np.ndarray) -> list[Instr]:
    """Decode an (N, 4) uint64 array; raises :class:`ISAError` naming the bad instruction."""
    words = np.ascontiguousarray(words, dtype="<u8").reshape(-1, INSTR_WORDS)
    out = []
    for idx, row in enumerate(words):
        try:
            out.append(decode(row.tobytes()))
        except ISAError as exc:
            raise ISAError(f"instruction {idx}: {exc}") from None
    return out


#: Every field name of any opcode (numba/bulk decoders get one int64 array per name).
ALL_FIELD_NAMES: tuple[str, ...] = tuple(dict.fromkeys(
    k for layout in LAYOUTS.values() for k in layout))


def field_arrays(words: np.ndarray) -> dict[str, np.ndarray]:
    """Bulk-decode an (N, 4) uint64 program into int64 arrays, one per field name.

    A field absent from an instruction's opcode reads 0. Opcodes are not checked here
    (``decode_words`` does that); illegal opcodes give all-zero fields.
    """
    return dict(zip(ALL_FIELD_NAMES, field_matrix(words)))


def field_matrix(words: np.ndarray) -> np.ndarray:
    """:func:`field_arrays` as one int64 matrix: row ``k`` holds field ``ALL_FIELD_NAMES[k]``
    of every instruction (what the numba engine indexes)."""
    words = np.ascontiguousarray(words, dtype=np.uint64).reshape(-1, INSTR_WORDS)
    n = len(words)
    matrix = np.zeros((len(ALL_FIELD_NAMES), n), dtype=np.int64)
    out = dict(zip(ALL_FIELD_NAMES, matrix))
    opcode = (words[:, 0] & np.uint64(0xF)).astype(np.int64)
    for op, layout in LAYOUTS.items():
        sel = np.flatnonzero(opcode == int(op))  # indices, not a mask: O(len(sel)) per field
        if not sel.size:
            continue
        cols = [words[sel, k] for k in range(INSTR_WORDS)]
        for key, f in layout.items():
            w = cols[f.lsb // 64]
            raw = (w >> np.uint64(f.lsb % 64)) & np.uint64((1 << f.width) - 1)
            val = raw.astype(np.int64)
            if f.signed:
                val = np.where(val >= (1 << (f.width - 1)), val - (1 << f.width), val)
            out[key][sel] = val
    out["opcode"][:] = opcode
    return matrix


# --------------------------------------------------------------------------------------------
# Timing contract
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Unit occupied, cycles it is busy from the start, and cycles from start to completion."""

    unit: Unit
    busy: int
    latency: int


def _cdiv(a: Any, b: Any) -> Any:
    return -(-a // b)


def _where(cond: Any, a: Any, b: Any) -> Any:
    return np.where(cond, a, b) if isinstance(cond, np.ndarray) else (a if cond else b)


#: Busy and latency formulas per opcode. They are Python expressions over the instruction's
#: fields and the config (rows, cols, dram_latency, dram_beat_bytes, vx_depth, ...) and are
#: evaluated as written, on scalars or numpy arrays; docs/architecture.md prints them verbatim.
TIMING: dict[Opcode, tuple[str, str]] = {
    Opcode.LOAD: ("n_inner * n_outer * where(fill, 1, cdiv(row_bytes, dram_beat_bytes))",
                  "busy + dram_latency"),
    Opcode.GATHER: ("cdiv(4 * n, dram_beat_bytes) + dram_latency"
                    " + n * cdiv(row_bytes, dram_beat_bytes)",
                    "busy + dram_latency"),
    Opcode.PRELOAD: ("rows", "busy"),
    Opcode.MATMUL: ("n_inner * n_outer", "busy + rows + cols"),
    Opcode.VECTOR: ("n + 3", "busy + vx_depth"),
    Opcode.ELTWISE: ("n_inner * n_outer", "busy + vx_depth"),
    Opcode.STORE: ("n_inner * n_outer * cdiv(row_bytes, dram_beat_bytes)",
                   "busy + dram_latency"),
    Opcode.SYNC: ("1", "1"),
    Opcode.BARRIER: ("1", "1"),
    Opcode.HALT: ("1", "1"),
}
_TIMING_CODE = {op: (compile(b, f"<busy {op.name}>", "eval"), compile(lat, f"<lat {op.name}>",
                                                                        "eval"))
                for op, (b, lat) in TIMING.items()}
_CONFIG_NAMES = ("rows", "cols", "dram_latency", "dram_beat_bytes", "vx_depth")


def _namespace(cfg: NPUConfig, fields: Mapping[str, Any]) -> dict[str, Any]:
    ns: dict[str, Any] = {k: getattr(cfg, k) for k in _CONFIG_NAMES}
    ns.update(fields)
    ns["cdiv"], ns["where"] = _cdiv, _where
    ns["__builtins__"] = {}
    return ns


def timing(instr: Instr, cfg: NPUConfig) -> Timing:
    """Unit, busy cycles and latency of one instruction under ``cfg`` (the contract)."""
    busy_code, lat_code = _TIMING_CODE[instr.opcode]
    ns = _namespace(cfg, instr.fields)
    busy = int(eval(busy_code, ns))  # noqa: S307 - our own constant formulas
    ns["busy"] = busy
    latency = int(eval(lat_code, ns))  # noqa: S307
    return Timing(OPCODE_UNIT[instr.opcode], busy, latency)


def timing_arrays(fields: Mapping[str, np.ndarray], cfg: NPUConfig
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`timing` over :func:`field_arrays` output: (unit, busy, latency)."""
    opcode = np.asarray(fields["opcode"])
    n = len(opcode)
    unit = np.full(n, int(Unit.NONE), dtype=np.int64)
    busy = np.ones(n, dtype=np.int64)
    latency = np.ones(n, dtype=np.int64)
    for op, (busy_code, lat_code) in _TIMING_CODE.items():
        sel = np.flatnonzero(opcode == int(op))
        if not sel.size:
            continue
        # The formulas read only the opcode's own fields.
        ns = _namespace(cfg, {k: np.asarray(fields[k])[sel] for k in LAYOUTS[op]})
        b = np.broadcast_to(np.asarray(eval(busy_code, ns), dtype=np.int64), (sel.size,))
        ns["busy"] = b
        lat = np.broadcast_to(np.asarray(eval(lat_code, ns), dtype=np.int64), b.shape)
        unit[sel] = int(OPCODE_UNIT[op])
        busy[sel] = b
        latency[sel] = lat
    return unit, busy, latency


# --------------------------------------------------------------------------------------------
# Static address footprint (validation at load; ADDRESS_OUT_OF_RANGE fault at dispatch)
# --------------------------------------------------------------------------------------------

def footprint(instr: Instr, cfg: NPUConfig) -> list[tuple[str, int, int]]:
    """The memory ranges an instruction touches: ``(space, first, end)`` half-open, where space
    is ``"dram"`` (bytes), ``"spad"`` or ``"acc"`` (rows). GATHER's table rows are dynamic and
    only its index list is listed; its rows are checked when the indices are read."""
    f = instr.fields
    op = instr.opcode
    space = ("spad", "acc")
    out: list[tuple[str, int, int]] = []
    if op in (Opcode.LOAD, Opcode.STORE):
        local = "dst" if op == Opcode.LOAD else "src"
        last_run = (f["n_outer"] - 1) * f[f"{local}_stride_outer"]
        out.append((space[f["mem"]], f[local] + last_run, f[local] + last_run + f["n_inner"]))
        out.append((space[f["mem"]], f[local], f[local] + f["n_inner"]))
        if not (op == Opcode.LOAD and f["fill"]):
            end = (f["dram_addr"] + (f["n_outer"] - 1) * f["dram_stride_outer"]
                   + (f["n_inner"] - 1) * f["dram_stride_inner"] + f["row_bytes"])
            out.append(("dram", f["dram_addr"], end))
    elif op == Opcode.GATHER:
        out.append((space[f["mem"]], f["dst"], f["dst"] + f["n"]))
        out.append(("dram", f["index_addr"], f["index_addr"] + 4 * f["n"]))
    elif op == Opcode.PRELOAD:
        out.append(("spad", f["spad_addr"], f["spad_addr"] + cfg.rows))
    elif op == Opcode.MATMUL:
        last = (f["spad_addr"] + (f["n_outer"] - 1) * f["spad_stride_outer"]
                + (f["n_inner"] - 1) * f["spad_stride_inner"])
        out.append(("spad", f["spad_addr"], last + 1))
        out.append(("acc", f["acc_addr"], f["acc_addr"] + f["n_inner"] * f["n_outer"]))
    elif op == Opcode.VECTOR:
        out.append(("acc", f["acc_addr"], f["acc_addr"] + f["n"]))
        out.append(("acc", f["param_addr"], f["param_addr"] + VECTOR_PARAM_ROWS))
        out.append(("spad", f["spad_addr"], f["spad_addr"] + f["n"]))
    elif op == Opcode.ELTWISE:
        for src in ("a", "b"):
            last = (f[f"{src}_addr"] + (f["n_outer"] - 1) * f[f"{src}_stride_outer"]
                    + (f["n_inner"] - 1) * f[f"{src}_stride_inner"])
            out.append(("spad", f[f"{src}_addr"], last + 1))
        out.append(("spad", f["dst"], f["dst"] + f["n_inner"] * f["n_outer"]))
    return out


def _eltwise_overlap(f: Mapping[str, int]) -> str | None:
    """ELTWISE's destination may coincide with an operand element for element (``dst = max(dst,
    x)``) or not touch it at all; any other overlap would make the result depend on the
    pipeline, so it is illegal."""
    n = f["n_inner"] * f["n_outer"]
    for src in ("a", "b"):
        addr = f[f"{src}_addr"]
        last = (addr + (f["n_outer"] - 1) * f[f"{src}_stride_outer"]
                + (f["n_inner"] - 1) * f[f"{src}_stride_inner"])
        same = (addr == f["dst"] and (f["n_inner"] == 1 or f[f"{src}_stride_inner"] == 1)
                and (f["n_outer"] == 1 or f[f"{src}_stride_outer"] == f["n_inner"]))
        if not same and addr < f["dst"] + n and f["dst"] <= last:
            return (f"ELTWISE destination rows [{f['dst']}, {f['dst'] + n}) overlap operand "
                    f"{src.upper()} without coinciding with it element for element")
    return None


def address_error(instr: Instr, cfg: NPUConfig, dram_bytes: int) -> str | None:
    """Why ``instr`` is illegal under ``cfg`` with ``dram_bytes`` of DRAM, or None if it is legal.

    Checks counts (>= 1), row widths and every static address range. This is the condition of
    the ADDRESS_OUT_OF_RANGE fault (raised at dispatch) and of program validation at load.
    """
    f = instr.fields
    op = instr.opcode
    for key in ("n", "n_inner", "n_outer", "row_bytes"):
        if key in f and f[key] < 1:
            return f"{op.name}.{key} must be >= 1"
    if op == Opcode.GATHER and f["n"] > cfg.gather_max:
        return f"GATHER.n={f['n']} exceeds gather_max={cfg.gather_max}"
    if "row_bytes" in f and f["row_bytes"] > cfg.mem_row_bytes(f["mem"]):
        return (f"{op.name}.row_bytes={f['row_bytes']} exceeds the {Mem(f['mem']).name} row of "
                f"{cfg.mem_row_bytes(f['mem'])} bytes")
    if op == Opcode.ELTWISE:
        why = _eltwise_overlap(f)
        if why:
            return why
    limits = {"dram": dram_bytes, "spad": cfg.spad_rows, "acc": cfg.acc_rows}
    for space, first, end in footprint(instr, cfg):
        if first < 0 or end > limits[space]:
            unit = "bytes" if space == "dram" else "rows"
            return (f"{op.name} touches {space} [{first}, {end}) outside [0, {limits[space]}) "
                    f"{unit}")
    return None


@functools.lru_cache(maxsize=4096)
def _header_legal(op: Opcode, wait: int, signal: int, engine: int) -> bool:
    """Whether :class:`Instr` accepts these token masks (and SYNC engine) for ``op``."""
    try:
        Instr(op, wait, signal, {"engine": engine} if op == Opcode.SYNC else {})
    except ISAError:
        return False
    return True


def static_faults(words: np.ndarray, cfg: NPUConfig, dram_bytes: int,
                  fields: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The dispatch-time fault of every instruction of a program, in bulk (int64 array):
    ``ILLEGAL_INSTRUCTION`` where :func:`decode` fails, ``ADDRESS_OUT_OF_RANGE`` where
    :func:`address_error` objects, else ``NONE``.

    The verdicts are exactly those of calling the two one by one (program validation and the
    runtime's static fault flags), but fast on large programs: a vectorised screen over
    :func:`field_arrays` flags a superset of the bad instructions (reserved bits from
    :data:`LAYOUTS`, token masks checked by :class:`Instr` once per distinct header, address
    ranges from :func:`footprint` itself), and only the flagged ones are decoded and checked.
    ``fields``: :func:`field_arrays` of ``words``, if the caller has them already.
    """
    words = np.ascontiguousarray(words, dtype=np.uint64).reshape(-1, INSTR_WORDS)
    if fields is None:
        fields = field_arrays(words)
    opcode = fields["opcode"]
    suspect = ~np.isin(opcode, [int(op) for op in Opcode])
    limits = {"dram": dram_bytes, "spad": cfg.spad_rows, "acc": cfg.acc_rows}
    for op, layout in LAYOUTS.items():
        sel = np.flatnonzero(opcode == int(op))
        if not sel.size:
            continue
        used = [0] * INSTR_WORDS
        for f in layout.values():
            used[f.lsb // 64] |= ((1 << f.width) - 1) << (f.lsb % 64)
        bad = np.zeros(sel.size, dtype=bool)
        for w in range(INSTR_WORDS):
            bad |= (words[sel, w] & np.uint64(~used[w] & ((1 << 64) - 1))) != 0
        m = len(Engine)  # token masks have one bit per engine
        header = (fields["wait"][sel] | fields["signal"][sel] << m
                  | fields["engine"][sel] << (2 * m))
        for key in np.unique(header).tolist():
            if not _header_legal(op, key & ((1 << m) - 1), (key >> m) & ((1 << m) - 1),
                                 key >> (2 * m)):
                bad |= header == key
        f = {k: fields[k][sel] for k in layout}
        for key in ("n", "n_inner", "n_outer", "row_bytes"):
            if key in f:
                bad |= f[key] < 1
        for key, fld in layout.items():  # enumerated fields with unassigned codes
            if fld.maximum is not None:
                bad |= f[key] > fld.maximum
        if op == Opcode.GATHER:
            bad |= f["n"] > cfg.gather_max
        if op == Opcode.ELTWISE:  # any overlap at all (a superset of the illegal ones)
            n = f["n_inner"] * f["n_outer"]
            for src in ("a", "b"):
                addr = f[f"{src}_addr"]
                last = (addr + (f["n_outer"] - 1) * f[f"{src}_stride_outer"]
                        + (f["n_inner"] - 1) * f[f"{src}_stride_inner"])
                bad |= (addr < f["dst"] + n) & (f["dst"] <= last)
        # footprint() indexes by `mem` and branches on `fill`: give it those as scalars.
        groups = [(m, fl) for m in ((0, 1) if "mem" in f else (None,))
                  for fl in ((0, 1) if "fill" in f else (None,))]
        for mem, fill in groups:
            part = np.ones(sel.size, dtype=bool)
            g: dict[str, Any] = dict(f)
            for key, value in (("mem", mem), ("fill", fill)):
                if value is not None:
                    part &= f[key] == value
                    g[key] = value
            if not part.any():
                continue
            g = {k: v if not isinstance(v, np.ndarray) else v[part] for k, v in g.items()}
            sub = np.zeros(int(part.sum()), dtype=bool)
            if mem is not None and "row_bytes" in g:
                sub |= g["row_bytes"] > cfg.mem_row_bytes(mem)
            proxy = SimpleNamespace(opcode=op, fields=g)  # all footprint() reads of an Instr
            for space, first, end in footprint(proxy, cfg):  # type: ignore[arg-type]
                sub |= (np.asarray(first) < 0) | (np.asarray(end) > limits[space])
            bad[part] |= sub
        suspect[sel] |= bad
    out = np.zeros(len(words), dtype=np.int64)
    for idx in np.flatnonzero(suspect).tolist():
        try:
            ins = decode(words[idx].astype("<u8").tobytes())
        except ISAError:
            out[idx] = Fault.ILLEGAL_INSTRUCTION
            continue
        if address_error(ins, cfg, dram_bytes) is not None:
            out[idx] = Fault.ADDRESS_OUT_OF_RANGE
    return out


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------

def instruction_table_markdown() -> str:
    """The instruction table of docs/architecture.md, generated from this module."""
    lines = ["| opcode | name | engine | unit | busy cycles | latency (start to completion) |",
             "|---|---|---|---|---|---|"]
    for op in Opcode:
        engine = OPCODE_ENGINE[op]
        eng = engine.name if engine is not None else ("`engine` field" if op == Opcode.SYNC
                                                      else "dispatcher")
        busy, lat = TIMING[op]
        lines.append(f"| {int(op)} | {op.name} | {eng} | {OPCODE_UNIT[op].name} | `{busy}` | "
                     f"`{lat}` |")
    lines.append("")
    lines.append("Bit layout (LSB first; 256-bit instructions, no field crosses a 64-bit word):")
    lines.append("")
    lines.append("| opcode | field | bits | signed | meaning |")
    lines.append("|---|---|---|---|---|")
    for op in Opcode:
        for key, f in LAYOUTS[op].items():
            if key in ("opcode", "wait", "signal"):
                continue
            lines.append(f"| {op.name} | `{key}` | [{f.lsb + f.width - 1}:{f.lsb}] | "
                         f"{'yes' if f.signed else 'no'} | {f.doc} |")
    header = LAYOUTS[Opcode.HALT]
    lines.append("")
    lines.append("Common header: " + ", ".join(
        f"`{k}` [{f.lsb + f.width - 1}:{f.lsb}] ({f.doc})" for k, f in header.items()) + ".")
    return "\n".join(lines)
