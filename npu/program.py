"""The program file (``.npub``): config, instruction stream, DRAM image, I/O bindings, metadata.

File layout (all little endian; data only, never pickle)::

    offset 0   magic    b"NPUB"
           4   u16      format version (FORMAT_VERSION)
           6   u16      reserved, 0
           8   u32      header length H
          12   H bytes  header, UTF-8 JSON (config, dram_bytes, counts, segments, bindings,
                        regions, metadata)
               pad to a multiple of 8 with zero bytes
               N * 32   instructions (N = header.n_instructions), see npu.isa
               ...      segment payloads, in header order, back to back
          -4   u32      CRC-32 of every byte before it

Everything is checked on load; any defect raises :class:`ProgramError` naming it.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import numpy as np

from npu.isa import (
    INSTR_BYTES,
    INSTR_WORDS,
    Fault,
    ISAError,
    NPUConfig,
    address_error,
    decode_words,
    static_faults,
)

__all__ = ["MAGIC", "FORMAT_VERSION", "DTYPES", "ProgramError", "Binding", "Segment", "Program",
           "label_region",
           "load", "save"]

MAGIC = b"NPUB"
FORMAT_VERSION = 1
#: Tensor element types a binding may declare.
DTYPES = ("int8", "uint8", "int32", "float32")
MAX_DRAM_BYTES = 1 << 32  # DRAM addresses are 32-bit


class ProgramError(ValueError):
    """A program (file or object) is malformed; the message says what and where."""


@dataclass(frozen=True)
class Binding:
    """A named tensor in DRAM: where it lives and how to interpret its bytes."""

    name: str
    addr: int
    shape: tuple[int, ...]
    dtype: str = "int8"
    layout: str = ""          # e.g. "NHWC", "NC": informative, used by the compiler/session
    scale: float = 1.0        # quantization: real = scale * (q - zero_point)
    zero_point: int = 0

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "addr": self.addr, "shape": list(self.shape),
                "dtype": self.dtype, "layout": self.layout, "scale": self.scale,
                "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Binding:
        if not isinstance(d, dict):
            raise ProgramError(f"{where}: binding must be an object")
        try:
            b = cls(name=d["name"], addr=d["addr"], shape=tuple(d["shape"]), dtype=d["dtype"],
                    layout=d.get("layout", ""), scale=d.get("scale", 1.0),
                    zero_point=d.get("zero_point", 0))
        except (KeyError, TypeError) as exc:
            raise ProgramError(f"{where}: binding is missing or mistypes {exc}") from None
        return b


@dataclass(frozen=True)
class Segment:
    """Initial DRAM contents (weights, constants) at ``addr``."""

    name: str
    addr: int
    data: bytes

    @property
    def end(self) -> int:
        return self.addr + len(self.data)


def label_region(regions: list[tuple[int, str]], index: int, label: str) -> None:
    """Start region ``label`` at instruction ``index`` in ``regions`` (a Program's list).
    A label given where the previous one starts replaces it, so no region is ever empty."""
    if regions and regions[-1][0] == index:
        regions[-1] = (index, label)
    else:
        regions.append((index, label))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Program:
    """An NPU program in memory. ``validate()`` checks it; ``load`` always validates."""

    config: NPUConfig
    instructions: np.ndarray                       # (N, 4) uint64
    dram_bytes: int
    segments: list[Segment] = field(default_factory=list)
    inputs: list[Binding] = field(default_factory=list)
    outputs: list[Binding] = field(default_factory=list)
    regions: list[tuple[int, str]] = field(default_factory=list)  # (first instruction, label)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.instructions)
        if arr.dtype != np.uint64 or arr.ndim != 2 or arr.shape[1] != INSTR_WORDS:
            try:
                arr = np.ascontiguousarray(arr, dtype=np.uint64).reshape(-1, INSTR_WORDS)
            except (ValueError, TypeError) as exc:
                raise ProgramError(f"instructions must be an (N, {INSTR_WORDS}) uint64 array: "
                                   f"{exc}") from None
        self.instructions = np.ascontiguousarray(arr)

    @property
    def n_instructions(self) -> int:
        return len(self.instructions)

    # Views -------------------------------------------------------------------------------
    def decoded(self):
        """The instructions as :class:`npu.isa.Instr` objects (raises ProgramError if illegal)."""
        try:
            return decode_words(self.instructions)
        except ISAError as exc:
            raise ProgramError(str(exc)) from None

    def initial_dram(self) -> np.ndarray:
        """A fresh DRAM image (uint8) with every segment in place."""
        dram = np.zeros(self.dram_bytes, dtype=np.uint8)
        for seg in self.segments:
            dram[seg.addr:seg.end] = np.frombuffer(seg.data, dtype=np.uint8)
        return dram

    def region_of(self, index: int) -> str:
        """Label of the region holding instruction ``index`` ("" before the first label)."""
        label = ""
        for start, name in self.regions:
            if start > index:
                break
            label = name
        return label

    # Validation --------------------------------------------------------------------------
    def validate(self, config: NPUConfig | None = None, *,
                 faults: np.ndarray | None = None) -> None:
        """Raise :class:`ProgramError` unless the program is well formed and every address in
        range. With ``config``, also require that the program was built for it. ``faults``:
        :func:`npu.isa.static_faults` of this program, if the caller has computed them."""
        if not isinstance(self.config, NPUConfig):
            raise ProgramError("program config is not an NPUConfig")
        if config is not None and config != self.config:
            diff = [k for k, v in config.to_dict().items() if self.config.to_dict()[k] != v]
            raise ProgramError(f"program was built for config {self.config.name!r}, not "
                               f"{config.name!r} (differs in {diff})")
        if not _is_int(self.dram_bytes) or not 0 < self.dram_bytes <= MAX_DRAM_BYTES:
            raise ProgramError(f"dram_bytes={self.dram_bytes!r} must be in (0, 2**32]")
        if faults is None:
            faults = static_faults(self.instructions, self.config, self.dram_bytes)  # in bulk
        if (faults == Fault.ILLEGAL_INSTRUCTION).any():
            self.decoded()  # raises, naming the first illegal instruction
        for idx in np.flatnonzero(faults)[:1].tolist():
            why = address_error(decode_words(self.instructions[idx:idx + 1])[0], self.config,
                                self.dram_bytes)
            raise ProgramError(f"instruction {idx}: {why}")
        spans: list[tuple[int, int, str]] = []
        names: set[str] = set()
        for seg in self.segments:
            if not isinstance(seg.name, str) or not _is_int(seg.addr) or \
                    not isinstance(seg.data, (bytes, bytearray)):
                raise ProgramError(f"segment {seg.name!r}: malformed")
            if seg.addr < 0 or seg.end > self.dram_bytes or not seg.data:
                raise ProgramError(f"segment {seg.name!r} [{seg.addr}, {seg.end}) is empty or "
                                   f"outside DRAM of {self.dram_bytes} bytes")
            spans.append((seg.addr, seg.end, f"segment {seg.name!r}"))
        for kind, bindings in (("input", self.inputs), ("output", self.outputs)):
            for b in bindings:
                self._check_binding(b, kind)
                if b.name in names:
                    raise ProgramError(f"{kind} {b.name!r}: name used twice")
                names.add(b.name)
                if kind == "input":
                    spans.append((b.addr, b.addr + b.nbytes, f"input {b.name!r}"))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ProgramError(f"{an} [{a0}, {a1}) overlaps {bn} [{b0}, {b1})")
        last = -1
        for item in self.regions:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and _is_int(item[0])
                    and isinstance(item[1], str)):
                raise ProgramError(f"region {item!r} must be (instruction index, label)")
            start = item[0]
            if not last < start < self.n_instructions:
                raise ProgramError(f"region {item[1]!r} starts at {start}: regions must be in "
                                   f"increasing order within the {self.n_instructions} "
                                   f"instructions")
            last = start
        if not isinstance(self.metadata, dict):
            raise ProgramError("metadata must be a JSON object")

    def _check_binding(self, b: Binding, kind: str) -> None:
        where = f"{kind} {b.name!r}"
        if not isinstance(b.name, str) or not b.name:
            raise ProgramError(f"{kind} binding needs a non-empty name")
        if b.dtype not in DTYPES:
            raise ProgramError(f"{where}: dtype {b.dtype!r} is not one of {DTYPES}")
        if not all(_is_int(s) and s >= 1 for s in b.shape) or not b.shape:
            raise ProgramError(f"{where}: shape {b.shape!r} must be positive integers")
        if not _is_int(b.addr) or b.addr < 0 or b.addr + b.nbytes > self.dram_bytes:
            raise ProgramError(f"{where}: [{b.addr}, {b.addr}+{b.nbytes}) is outside DRAM of "
                               f"{self.dram_bytes} bytes")
        # A comparison, not math.isfinite (which overflows on huge ints); NaN compares False.
        if not isinstance(b.scale, (int, float)) or isinstance(b.scale, bool) \
                or not 0 < b.scale <= sys.float_info.max:
            raise ProgramError(f"{where}: scale {b.scale!r} must be positive and finite")
        if not _is_int(b.zero_point) or not -(1 << 31) <= b.zero_point < (1 << 31):
            raise ProgramError(f"{where}: zero_point {b.zero_point!r} must be an int32")
        if not isinstance(b.layout, str):
            raise ProgramError(f"{where}: layout must be a string")

    # Serialisation -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise (validating first)."""
        self.validate()
        header = {
            "config": self.config.to_dict(),
            "dram_bytes": self.dram_bytes,
            "n_instructions": self.n_instructions,
            "segments": [{"name": s.name, "addr": s.addr, "size": len(s.data)}
                         for s in self.segments],
            "inputs": [b.to_dict() for b in self.inputs],
            "outputs": [b.to_dict() for b in self.outputs],
            "regions": [[i, label] for i, label in self.regions],
            "metadata": self.metadata,
        }
        try:
            head = json.dumps(header, sort_keys=True, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ProgramError(f"metadata is not JSON-serialisable: {exc}") from None
        parts = [MAGIC, struct.pack("<HHI", FORMAT_VERSION, 0, len(head)), head,
                 b"\0" * (-(12 + len(head)) % 8),
                 self.instructions.astype("<u8").tobytes()]
        parts += [bytes(s.data) for s in self.segments]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, config: NPUConfig | None = None) -> Program:
        """Parse and validate; every defect raises :class:`ProgramError`."""
        data = bytes(data)
        if len(data) < 16:
            raise ProgramError(f"file is truncated ({len(data)} bytes)")
        if data[:4] != MAGIC:
            raise ProgramError(f"not an NPU program: magic {data[:4]!r} != {MAGIC!r}")
        version, _reserved, head_len = struct.unpack_from("<HHI", data, 4)
        if version != FORMAT_VERSION:
            raise ProgramError(f"unsupported program format version {version} "
                               f"(this build reads {FORMAT_VERSION})")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise ProgramError("checksum mismatch: the file is truncated or corrupted")
        if 12 + head_len > len(data) - 4:
            raise ProgramError("header length runs past the end of the file")
        try:
            header = json.loads(data[12:12 + head_len].decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ProgramError(f"header is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise ProgramError("header must be a JSON object")
        try:
            prog_config = NPUConfig.from_dict(header["config"])
            n_instr = header["n_instructions"]
            seg_table = header["segments"]
            dram_bytes = header["dram_bytes"]
            inputs = [Binding.from_dict(b, "input") for b in header["inputs"]]
            outputs = [Binding.from_dict(b, "output") for b in header["outputs"]]
            regions = [tuple(r) for r in header["regions"]]
            metadata = header["metadata"]
        except KeyError as exc:
            raise ProgramError(f"header lacks {exc}") from None
        except (ISAError, TypeError) as exc:
            raise ProgramError(f"header: {exc}") from None
        if not _is_int(n_instr) or n_instr < 0 or not isinstance(seg_table, list):
            raise ProgramError("header: n_instructions/segments malformed")
        pos = 12 + head_len
        pos += -pos % 8
        end = len(data) - 4
        if pos + n_instr * INSTR_BYTES > end:
            raise ProgramError(f"truncated: {n_instr} instructions do not fit in the file")
        words = np.frombuffer(data, dtype="<u8", count=n_instr * INSTR_WORDS,
                              offset=pos).astype(np.uint64).reshape(-1, INSTR_WORDS)
        pos += n_instr * INSTR_BYTES
        segments = []
        for entry in seg_table:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and _is_int(entry.get("addr")) and _is_int(entry.get("size"))
                    and entry["size"] >= 0):
                raise ProgramError(f"segment entry {entry!r} is malformed")
            if pos + entry["size"] > end:
                raise ProgramError(f"truncated: segment {entry['name']!r} runs past the end")
            segments.append(Segment(entry["name"], entry["addr"],
                                    data[pos:pos + entry["size"]]))
            pos += entry["size"]
        if pos != end:
            raise ProgramError(f"{end - pos} unexpected bytes after the last segment")
        prog = cls(prog_config, words, dram_bytes, segments, inputs, outputs,
                   [(r[0], r[1]) if len(r) == 2 else r for r in regions], metadata)
        prog.validate(config)
        return prog


def save(program: Program, path: str | PathLike[str]) -> None:
    """Write ``program`` to ``path`` (validated)."""
    with open(path, "wb") as fh:
        fh.write(program.to_bytes())


def load(path: str | PathLike[str], config: NPUConfig | None = None) -> Program:
    """Read and validate a program file; with ``config``, require that it was built for it."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ProgramError(f"cannot read program {str(path)!r}: {exc}") from None
    return Program.from_bytes(data, config)
