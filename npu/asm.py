"""Text assembly of NPU programs: :func:`assemble` (text -> Program), :func:`disassemble`.

A whole ``.npub`` is expressible as text, and ``assemble(disassemble(p))`` serialises to the
same bytes as ``p``. One statement per line; ``#`` starts a comment (outside quoted strings)::

    .config npu16                 # preset name, inline JSON object, or a .json path
    .dram_bytes 4096              # optional (default: covers every segment, binding and access)
    .input  x addr=0 shape=4,16 dtype=int8 layout=NC scale=0.5 zero_point=-3
    .output y addr=64 shape=4,16  # dtype int8, layout "", scale 1.0, zero_point 0 by default
    .segment w addr=128           # initial DRAM contents: hex lines follow ...
        00010203 04050607
    .segment b addr=512 file=b.bin  # ... or a binary file, relative to the .s file
    .meta source="hand written"   # free metadata: key=<any JSON value>
    .region layer0                # labels the instructions that follow (for the profile)
    LOAD dram_addr=0 dst=0 n_inner=4 dram_stride_inner=16 row_bytes=16 signal=EX
    MATMUL spad_addr=0 acc_addr=0 n_inner=4 swap=1 wait=LD signal=VX
    SYNC engine=ST wait=VX
    .word 0x0...                  # a raw 256-bit instruction word (e.g. an illegal one)
    HALT

Instructions are written ``OPCODE field=value ...`` with the field names of
:data:`npu.isa.LAYOUTS`. Values are integers (``12``, ``-3``, ``0x40``, ``0b101``); ``wait``
and ``signal`` take engine names joined by commas (``wait=LD,VX``), SYNC's ``engine`` an engine
name, ``mem`` SPAD/ACC and ELTWISE's ``func`` ADD/MAX (numbers are accepted too).

**Fields left out** take the builder's defaults, :data:`npu.builder.DEFAULTS` (``n_outer=1``,
``spad_stride_inner=1``, ``a/b_stride_inner=1``, ``clamp_min=-128``, ``clamp_max=127``), and
every other field is 0, so assembly and :class:`npu.builder.ProgramBuilder` read alike. The
disassembler prints exactly the fields that differ from those defaults.

Names (segments, bindings, labels, metadata keys, file paths) are bare words
(``[A-Za-z0-9_.:/@+-]+``) or JSON strings. Errors raise :class:`AsmError` naming the file, the
line and the field: ``prog.s:12: MATMUL.n_inner=70000 out of range [0, 65535] ...``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npu.builder import DEFAULTS
from npu.isa import (
    INSTR_BITS,
    INSTR_WORDS,
    LAYOUTS,
    PRESETS,
    EltFunc,
    Engine,
    Instr,
    ISAError,
    Mem,
    NPUConfig,
    Opcode,
    address_error,
    decode,
    encode,
    footprint,
    get_config,
)
from npu.program import DTYPES, Binding, Program, ProgramError, Segment

__all__ = ["AsmError", "assemble", "assemble_file", "disassemble", "format_instruction",
           "parse_instruction"]

_HEADER_FIELDS = ("opcode", "wait", "signal")
_BARE = re.compile(r"[A-Za-z0-9_.:/@+\-]+", re.ASCII)
_ATOM_END = re.compile(r"[\s=#]")
_HEX_LINE = re.compile(r"[0-9A-Fa-f]+(?:\s+[0-9A-Fa-f]+)*")
#: Fields whose values are printed and read as names.
_ENUM_FIELDS: dict[str, type] = {"mem": Mem, "func": EltFunc, "engine": Engine}
_HEX_BYTES_PER_LINE = 32
_NO_VALUE = object()


class AsmError(ProgramError):
    """An assembly error; the message starts with ``file:line:``."""

    def __init__(self, message: str, filename: str = "<asm>", line: int | None = None) -> None:
        self.filename = filename
        self.line = line
        self.reason = message
        loc = f"{filename}:{line}" if line is not None else filename
        super().__init__(f"{loc}: {message}")


class _LineError(Exception):
    """Raised inside line parsing; turned into :class:`AsmError` with the location."""


# --------------------------------------------------------------------------------------------
# Lexing
# --------------------------------------------------------------------------------------------

@dataclass
class _Tok:
    """``key=value`` (key set) or a bare operand (key None). ``value`` is the bare text, or the
    decoded JSON when it was written quoted / bracketed (then ``quoted`` is True)."""

    key: str | None
    value: Any
    quoted: bool


_DECODER = json.JSONDecoder()


def _read_atom(line: str, i: int) -> tuple[Any, bool, int]:
    """Read a bare word or a JSON value (string, list, object) at ``i``."""
    if line[i] in "\"[{":
        try:
            value, end = _DECODER.raw_decode(line, i)
        except json.JSONDecodeError as exc:
            raise _LineError(f"malformed JSON at column {i + 1}: {exc.msg}") from None
        return value, True, end
    m = _ATOM_END.search(line, i)
    end = m.start() if m else len(line)
    return line[i:end], False, end


def _tokens(line: str) -> list[_Tok]:
    out: list[_Tok] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i >= n or line[i] == "#":
            return out
        if line[i] == "=":
            raise _LineError(f"'=' without a name at column {i + 1}")
        atom, quoted, i = _read_atom(line, i)
        if i < n and line[i] == "=":
            if quoted and not isinstance(atom, str):
                raise _LineError(f"a name must be a word or a string, got {atom!r}")
            i += 1
            if i >= n or line[i].isspace() or line[i] == "#":
                raise _LineError(f"{atom}= has no value")
            value, vquoted, i = _read_atom(line, i)
            out.append(_Tok(atom, value, vquoted))
        else:
            out.append(_Tok(None, atom, quoted))
        if i < n and not (line[i].isspace() or line[i] == "#"):
            raise _LineError(f"unexpected {line[i]!r} at column {i + 1}")


def _name(text: str) -> str:
    """A name as the lexer reads it back: bare when possible, else a JSON string."""
    return text if _BARE.fullmatch(text) else json.dumps(text)


def _int(text: Any, what: str) -> int:
    if isinstance(text, str):
        try:
            return int(text, 0)
        except ValueError:
            pass
    raise _LineError(f"{what}={text if isinstance(text, str) else json.dumps(text)} "
                     f"is not an integer")


def _str(tok: _Tok, what: str) -> str:
    if not isinstance(tok.value, str):
        raise _LineError(f"{what} must be a word or a string, got {json.dumps(tok.value)}")
    return tok.value


# --------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------

def _engine_mask(text: Any, what: str) -> int:
    if not isinstance(text, str):
        raise _LineError(f"{what} must list engines, e.g. LD,VX")
    if text[:1].isdigit():
        return _int(text, what)
    mask = 0
    for part in text.split(","):
        try:
            eng = Engine[part.strip().upper()]
        except KeyError:
            raise _LineError(f"{what}: unknown engine {part!r}; engines are "
                             f"{', '.join(e.name for e in Engine)}") from None
        if mask & (1 << eng):
            raise _LineError(f"{what}: engine {eng.name} named twice")
        mask |= 1 << eng
    return mask


def _field_value(op: Opcode, key: str, text: Any) -> int:
    what = f"{op.name}.{key}"
    enum_type = _ENUM_FIELDS.get(key)
    if enum_type is not None and isinstance(text, str) and not text[:1].isdigit():
        try:
            return int(enum_type[text.upper()])
        except KeyError:
            raise _LineError(f"{what}={text}: expected one of "
                             f"{', '.join(e.name for e in enum_type)} or a number") from None
    return _int(text, what)


def _instr_from_tokens(toks: list[_Tok]) -> Instr:
    head = toks[0]
    if head.key is not None or head.quoted:
        raise _LineError("expected an instruction or a directive")
    try:
        op = Opcode[head.value.upper()]
    except KeyError:
        raise _LineError(f"unknown instruction {head.value!r}; instructions are "
                         f"{', '.join(o.name for o in Opcode)}") from None
    layout = LAYOUTS[op]
    body = [k for k in layout if k not in _HEADER_FIELDS]
    values: dict[str, int] = dict(DEFAULTS.get(op, {}))
    masks = {"wait": 0, "signal": 0}
    seen: set[str] = set()
    for tok in toks[1:]:
        if tok.key is None:
            raise _LineError(f"{op.name}: expected field=value, got {tok.value!r}")
        key = tok.key
        if key in seen:
            raise _LineError(f"{op.name}.{key} given twice")
        seen.add(key)
        if key in masks:
            masks[key] = _engine_mask(tok.value, f"{op.name}.{key}")
        elif key in body:
            if tok.quoted:
                raise _LineError(f"{op.name}.{key} must be a number")
            values[key] = _field_value(op, key, tok.value)
        else:
            raise _LineError(f"{op.name} has no field {key!r}; fields are "
                             f"{', '.join(body + ['wait', 'signal'])}")
    try:
        return Instr(op, masks["wait"], masks["signal"], values)
    except ISAError as exc:
        raise _LineError(str(exc)) from None


def parse_instruction(line: str) -> Instr:
    """Parse one instruction line (``MATMUL n_inner=4 ...``); raises :class:`AsmError`."""
    try:
        toks = _tokens(line)
        if not toks:
            raise _LineError("empty line")
        return _instr_from_tokens(toks)
    except _LineError as exc:
        raise AsmError(str(exc), "<instruction>") from None


def _mask_text(mask: int) -> str:
    return ",".join(e.name for e in Engine if mask & (1 << e))


def format_instruction(instr: Instr) -> str:
    """One instruction as assembly text: the fields that differ from their defaults."""
    defaults = DEFAULTS.get(instr.opcode, {})
    parts = [f"{instr.opcode.name:<7}"]
    for key, value in instr.fields.items():
        if value == defaults.get(key, 0) and not (instr.opcode == Opcode.SYNC and key == "engine"):
            continue
        enum_type = _ENUM_FIELDS.get(key)
        if enum_type is not None and value in enum_type._value2member_map_:
            parts.append(f"{key}={enum_type(value).name}")
        else:  # plain numbers (every encodable value of an enum field has a name)
            parts.append(f"{key}={value}")
    for key in ("wait", "signal"):
        mask = getattr(instr, key)
        if mask:
            parts.append(f"{key}={_mask_text(mask)}")
    return " ".join(parts).rstrip()


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------

@dataclass
class _Seg:
    name: str
    addr: int
    line: int
    data: bytearray = field(default_factory=bytearray)
    from_file: bool = False


@dataclass
class _State:
    filename: str
    base_dir: Path
    config: tuple[_Tok, int] | None = None
    dram_bytes: tuple[int, int] | None = None
    segments: list[_Seg] = field(default_factory=list)
    inputs: list[tuple[Binding, int]] = field(default_factory=list)
    outputs: list[tuple[Binding, int]] = field(default_factory=list)
    regions: list[tuple[int, str, int]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    words: list[np.ndarray] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    data_seg: _Seg | None = None  # segment receiving hex lines


def _kv(toks: list[_Tok], allowed: Sequence[str], what: str) -> dict[str, _Tok]:
    out: dict[str, _Tok] = {}
    for tok in toks:
        if tok.key is None:
            raise _LineError(f"{what}: unexpected operand {tok.value!r}; expected "
                             f"{', '.join(k + '=...' for k in allowed)}")
        if tok.key not in allowed:
            raise _LineError(f"{what}: unknown option {tok.key!r}; options are "
                             f"{', '.join(allowed)}")
        if tok.key in out:
            raise _LineError(f"{what}: {tok.key} given twice")
        out[tok.key] = tok
    return out


def _one_operand(toks: list[_Tok], directive: str) -> _Tok:
    if len(toks) != 2 or toks[1].key is not None:
        raise _LineError(f"{directive} takes exactly one operand")
    return toks[1]


def _binding(toks: list[_Tok], kind: str) -> Binding:
    directive = f".{kind}"
    if len(toks) < 2 or toks[1].key is not None:
        raise _LineError(f"{directive} needs a name: {directive} NAME addr=.. shape=..")
    name = _str(toks[1], f"{directive} name")
    opts = _kv(toks[2:], ("addr", "shape", "dtype", "layout", "scale", "zero_point"),
               f"{directive} {name}")
    for key in ("addr", "shape"):
        if key not in opts:
            raise _LineError(f"{directive} {name}: {key}= is required")
    where = f"{directive} {name}"
    addr = _int(opts["addr"].value, f"{where}: addr")
    shape_tok = opts["shape"]
    if shape_tok.quoted:
        if not isinstance(shape_tok.value, list):
            raise _LineError(f"{where}: shape must be like 4,16 or [4, 16]")
        shape = tuple(shape_tok.value)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise _LineError(f"{where}: shape {shape_tok.value} must hold integers")
    else:
        shape = tuple(_int(s, f"{where}: shape") for s in shape_tok.value.split(","))
    kw: dict[str, Any] = {}
    if "dtype" in opts:
        kw["dtype"] = _str(opts["dtype"], f"{where}: dtype")
        if kw["dtype"] not in DTYPES:
            raise _LineError(f"{where}: dtype {kw['dtype']!r} is not one of {', '.join(DTYPES)}")
    if "layout" in opts:
        kw["layout"] = _str(opts["layout"], f"{where}: layout")
    if "scale" in opts:
        tok = opts["scale"]
        try:
            scale = tok.value if tok.quoted else json.loads(tok.value)
        except json.JSONDecodeError:
            scale = None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise _LineError(f"{where}: scale={tok.value} is not a number")
        kw["scale"] = scale
    if "zero_point" in opts:
        kw["zero_point"] = _int(opts["zero_point"].value, f"{where}: zero_point")
    return Binding(name, addr, shape, **kw)


def _directive(st: _State, toks: list[_Tok], lineno: int) -> None:
    d = toks[0].value
    if d == ".config":
        if st.config is not None:
            raise _LineError(f".config given twice (first on line {st.config[1]})")
        st.config = (_one_operand(toks, ".config"), lineno)
    elif d == ".dram_bytes":
        if st.dram_bytes is not None:
            raise _LineError(f".dram_bytes given twice (first on line {st.dram_bytes[1]})")
        st.dram_bytes = (_int(_one_operand(toks, ".dram_bytes").value, ".dram_bytes"), lineno)
    elif d in (".input", ".output"):
        b = _binding(toks, d[1:])
        (st.inputs if d == ".input" else st.outputs).append((b, lineno))
    elif d == ".segment":
        if len(toks) < 2 or toks[1].key is not None:
            raise _LineError(".segment needs a name: .segment NAME addr=N [file=PATH]")
        name = _str(toks[1], ".segment name")
        opts = _kv(toks[2:], ("addr", "file"), f".segment {name}")
        if "addr" not in opts:
            raise _LineError(f".segment {name}: addr= is required")
        seg = _Seg(name, _int(opts["addr"].value, f".segment {name}: addr"), lineno)
        if "file" in opts:
            path = st.base_dir / _str(opts["file"], f".segment {name}: file")
            try:
                seg.data += path.read_bytes()
            except OSError as exc:
                raise _LineError(f".segment {name}: cannot read {str(path)!r}: "
                                 f"{exc.strerror}") from None
            seg.from_file = True
        else:
            st.data_seg = seg
        st.segments.append(seg)
    elif d == ".region":
        label = _str(_one_operand(toks, ".region"), ".region label")
        index = len(st.words)
        if st.regions and st.regions[-1][0] == index:
            raise _LineError(f".region {st.regions[-1][1]!r} on line {st.regions[-1][2]} "
                             f"labels no instructions")
        st.regions.append((index, label, lineno))
    elif d == ".meta":
        if len(toks) != 2 or toks[1].key is None:
            raise _LineError(".meta takes one key=value (the value is JSON)")
        tok = toks[1]
        value = tok.value
        if not tok.quoted:
            try:
                value = json.loads(tok.value)
            except json.JSONDecodeError:
                raise _LineError(f".meta {tok.key}={tok.value}: the value is not JSON (quote "
                                 f"strings)") from None
        if tok.key in st.metadata:
            raise _LineError(f".meta {tok.key} given twice")
        st.metadata[tok.key] = value
    elif d == ".word":
        text = _one_operand(toks, ".word").value
        value = _int(text, ".word")
        if not 0 <= value < (1 << INSTR_BITS):
            raise _LineError(f".word {text} is not a {INSTR_BITS}-bit unsigned value")
        st.words.append(np.frombuffer(value.to_bytes(INSTR_BITS // 8, "little"), dtype="<u8"))
        st.lines.append(lineno)
    else:
        raise _LineError(f"unknown directive {d!r}; directives are .config, .dram_bytes, "
                         f".input, .output, .segment, .region, .meta, .word")


def _resolve_config(st: _State, config: str | NPUConfig | None) -> NPUConfig:
    requested = get_config(config) if config is not None else None
    if st.config is None:
        return requested or get_config(None)
    tok, lineno = st.config
    try:
        if tok.quoted and isinstance(tok.value, dict):
            cfg = NPUConfig.from_dict(tok.value)
        elif isinstance(tok.value, str) and tok.value.endswith(".json"):
            cfg = get_config(str(st.base_dir / tok.value))
        elif isinstance(tok.value, str):
            cfg = get_config(tok.value)
        else:
            raise ISAError(".config needs a preset name, a JSON object or a .json path")
    except ISAError as exc:
        raise AsmError(f".config: {exc}", st.filename, lineno) from None
    if requested is not None and requested != cfg:
        raise AsmError(f".config {cfg.name} differs from the requested config "
                       f"{requested.name}", st.filename, lineno)
    return cfg


def _default_dram_bytes(st: _State, instrs: list[Instr | None], cfg: NPUConfig) -> int:
    """Smallest multiple of 64 covering segments, bindings and static DRAM accesses."""
    top = 64
    for seg in st.segments:
        top = max(top, seg.addr + len(seg.data))
    for b, _ in st.inputs + st.outputs:
        try:
            top = max(top, b.addr + b.nbytes)
        except (TypeError, ValueError):
            pass  # validation reports the binding
    for ins in instrs:
        if ins is not None:
            for space, _first, end in footprint(ins, cfg):
                if space == "dram":
                    top = max(top, end)
    return -(-top // 64) * 64


def assemble(text: str, *, filename: str = "<asm>", base_dir: str | os.PathLike[str] | None = None,
             config: str | NPUConfig | None = None, validate: bool = True) -> Program:
    """Assemble program text into a :class:`~npu.program.Program`.

    ``filename`` is used in error messages; ``base_dir`` resolves ``file=`` and ``.json`` paths
    (default: the current directory). ``config`` is used when the text has no ``.config`` and must
    match it otherwise. With ``validate`` (default) the program is checked like a loaded file,
    and instruction errors name their line; ``validate=False`` keeps out-of-range addresses and
    illegal ``.word`` instructions (for fault tests).
    """
    st = _State(filename, Path(base_dir) if base_dir is not None else Path.cwd())
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            body = line.split("#", 1)[0].strip()
            if st.data_seg is not None and body and _HEX_LINE.fullmatch(body):
                try:
                    st.data_seg.data += bytes.fromhex(body)  # fast path: whole bytes
                except ValueError:
                    odd = next(g for g in body.split() if len(g) % 2)
                    raise _LineError(f"hex group {odd!r} has an odd number of digits") from None
                continue
            toks = _tokens(line)
            if not toks:
                continue
            if st.data_seg is not None:
                if not st.data_seg.data:
                    raise AsmError(f".segment {st.data_seg.name} has no data (hex lines or "
                                   f"file=)", filename, st.data_seg.line)
                st.data_seg = None
            head = toks[0]
            if head.key is None and not head.quoted and head.value.startswith("."):
                _directive(st, toks, lineno)
            elif _HEX_LINE.fullmatch(body):
                raise _LineError("hex data outside a .segment")
            else:
                st.words.append(np.frombuffer(encode(_instr_from_tokens(toks)), dtype="<u8"))
                st.lines.append(lineno)
        except _LineError as exc:
            raise AsmError(str(exc), filename, lineno) from None
    if st.data_seg is not None and not st.data_seg.data:
        raise AsmError(f".segment {st.data_seg.name} has no data (hex lines or file=)", filename,
                       st.data_seg.line)
    if st.regions and st.regions[-1][0] == len(st.words):
        raise AsmError(f".region {st.regions[-1][1]!r} labels no instructions", filename,
                       st.regions[-1][2])

    cfg = _resolve_config(st, config)
    instrs: list[Instr | None] = []
    for row, lineno in zip(st.words, st.lines):
        try:
            instrs.append(decode(row.tobytes()))
        except ISAError as exc:
            if validate:
                raise AsmError(str(exc), filename, lineno) from None
            instrs.append(None)
    if st.dram_bytes is not None:
        dram_bytes = st.dram_bytes[0]
    else:
        dram_bytes = _default_dram_bytes(st, instrs, cfg)
    words = np.array(st.words, dtype=np.uint64).reshape(-1, INSTR_WORDS)
    program = Program(cfg, words, dram_bytes,
                      [Segment(s.name, s.addr, bytes(s.data)) for s in st.segments],
                      [b for b, _ in st.inputs], [b for b, _ in st.outputs],
                      [(i, label) for i, label, _ in st.regions], dict(st.metadata))
    if validate:
        if st.dram_bytes is not None and not 0 < dram_bytes <= 1 << 32:
            raise AsmError(f".dram_bytes {dram_bytes} must be in (0, 2**32]", filename,
                           st.dram_bytes[1])
        for ins, lineno in zip(instrs, st.lines):
            why = address_error(ins, cfg, dram_bytes) if ins is not None else None
            if why:
                raise AsmError(why, filename, lineno)
        try:
            program.validate()
        except ProgramError as exc:
            raise AsmError(str(exc), filename) from None
    return program


def assemble_file(path: str | os.PathLike[str], *, config: str | NPUConfig | None = None,
                  validate: bool = True) -> Program:
    """Assemble the file at ``path`` (``file=`` paths are relative to its folder)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AsmError(f"cannot read assembly: {exc}", str(path)) from None
    return assemble(text, filename=str(path), base_dir=p.parent, config=config,
                    validate=validate)


# --------------------------------------------------------------------------------------------
# Disassembly
# --------------------------------------------------------------------------------------------

def _binding_text(kind: str, b: Binding) -> str:
    parts = [f".{kind:<6} {_name(b.name)} addr={b.addr}",
             "shape=" + ",".join(str(s) for s in b.shape)]
    if b.dtype != "int8":
        parts.append(f"dtype={_name(b.dtype)}")
    if b.layout:
        parts.append(f"layout={_name(b.layout)}")
    if not (type(b.scale) is float and b.scale == 1.0):  # keep an int 1 an int: same bytes
        parts.append(f"scale={json.dumps(b.scale)}")
    if b.zero_point:
        parts.append(f"zero_point={b.zero_point}")
    return " ".join(parts)


def _hex_lines(data: bytes) -> list[str]:
    out = []
    for pos in range(0, len(data), _HEX_BYTES_PER_LINE):
        chunk = data[pos:pos + _HEX_BYTES_PER_LINE].hex()
        out.append("    " + " ".join(chunk[i:i + 8] for i in range(0, len(chunk), 8)))
    return out


def disassemble(program: Program, *,
                segment_files: Mapping[int, str] | None = None) -> str:
    """The program as assembly text; assembling it gives the same bytes.

    ``segment_files`` maps segment indices to file paths (relative to the .s file) that the
    caller writes; those segments are referenced with ``file=`` instead of hex lines.
    """
    cfg = program.config
    lines = [f"# NPU program: {program.n_instructions} instruction(s), "
             f"{len(program.segments)} segment(s)"]
    if PRESETS.get(cfg.name) == cfg:
        lines.append(f".config {cfg.name}")
    else:
        lines.append(f".config {cfg.to_json()}")
    lines.append(f".dram_bytes {program.dram_bytes}")
    for key, value in program.metadata.items():
        lines.append(f".meta {_name(key)}={json.dumps(value)}")
    for b in program.inputs:
        lines.append(_binding_text("input", b))
    for b in program.outputs:
        lines.append(_binding_text("output", b))
    for idx, seg in enumerate(program.segments):
        head = f".segment {_name(seg.name)} addr={seg.addr}"
        if segment_files and idx in segment_files:
            lines.append(f"{head} file={_name(segment_files[idx])}")
        else:
            lines.append(f"{head}  # {len(seg.data)} bytes")
            lines.extend(_hex_lines(bytes(seg.data)))
    lines.append("")
    labels = dict(program.regions)
    for idx, row in enumerate(program.instructions):
        if idx in labels:
            lines.append(f".region {_name(labels[idx])}")
        raw = row.astype("<u8").tobytes()
        try:
            text = format_instruction(decode(raw))
        except ISAError:
            text = f".word 0x{int.from_bytes(raw, 'little'):064x}"
        lines.append(f"{text:<60} # {idx}")
    return "\n".join(lines) + "\n"
