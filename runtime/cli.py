"""``npu run`` and ``npu profile``: execute a program file, or execute it and profile the run.

Registered by :mod:`npu.cli` through :func:`add_parser`. Exit status: 0 success, 2 a user error
(unreadable program, missing/extra/ill-shaped input, unwritable output), 3 a machine fault
(printed with its code, cycle, and the faulting instruction's disassembly and region).

Other layers reuse the pieces: :func:`profile_result` prints and writes everything ``npu
profile`` does for any :class:`~npu.runtime.result.RunResult`, and
:func:`register_profile_source` lets a higher layer (the compiler, for ``.onnx``) make ``npu
profile FILE`` accept its own file types without this module importing it (imports point down).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npu.isa import ISAError, decode
from npu.program import Binding, Program, load
from npu.runtime.io import _covered_by_segments, encode_input
from npu.runtime.result import NPUFault, RunResult

__all__ = ["add_parser", "profile_result", "register_profile_source", "parse_inputs",
           "check_inputs", "execute", "describe_fault", "UsageError", "EXIT_USAGE",
           "EXIT_FAULT"]

#: Exit status of a user error (same as ``npu.cli``'s) and of a machine fault.
EXIT_USAGE = 2
EXIT_FAULT = 3
ENGINES = ("numba", "reference")


class UsageError(Exception):
    """A user error: printed as ``npu <command>: error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------
# Profile sources registered by higher layers (e.g. the compiler for .onnx)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    run: Callable[[argparse.Namespace], RunResult]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None


_SOURCES: dict[str, _Source] = {}
_PROFILE_PARSER: list[argparse.ArgumentParser] = []  # set by add_parser


def register_profile_source(suffix: str, run: Callable[[argparse.Namespace], RunResult],
                            add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                            ) -> None:
    """Make ``npu profile FILE`` with this ``suffix`` (e.g. ``".onnx"``) call ``run(args)``
    for the :class:`RunResult` to profile, instead of loading FILE as a program.

    ``args`` holds ``program`` (the file), ``input`` (``NAME=FILE.npy`` strings; see
    :func:`parse_inputs`), ``engine``, ``watchdog``, ``progress`` and whatever
    ``add_arguments(parser)`` added to the profile parser (called now if the parser exists,
    else when it is built). ``run`` may raise :class:`UsageError` or :class:`NPUFault`.
    """
    suffix = suffix.lower()
    if not suffix.startswith("."):
        raise ValueError(f"suffix must start with '.', got {suffix!r}")
    _SOURCES[suffix] = _Source(run, add_arguments)
    if add_arguments is not None and _PROFILE_PARSER:
        add_arguments(_PROFILE_PARSER[-1])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def parse_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    """Read ``NAME=FILE.npy`` arguments into arrays (no pickles). Raises :class:`UsageError`
    naming the bad argument or file."""
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--input expects NAME=FILE.npy, got {spec!r}")
        if name in arrays:
            raise UsageError(f"input {name!r} is given twice")
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"input {name!r}: cannot read {path!r} as a .npy array: "
                             f"{exc}") from None
        if not isinstance(arrays[name], np.ndarray):
            raise UsageError(f"input {name!r}: {path!r} holds several arrays (.npz); "
                             f"give one .npy file per input")
    return arrays


def _required(program: Program) -> list[Binding]:
    """Input bindings the caller must give (those not fully initialised by segments)."""
    return [b for b in program.inputs
            if not _covered_by_segments(program, b.addr, b.addr + b.nbytes)]


def check_inputs(program: Program, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check arrays against the program's input bindings before running: no unknown name, every
    required input given, and each array acceptable to its binding (shape, dtype range; the
    rules of :func:`npu.runtime.io.encode_input`). Raises :class:`UsageError` naming the
    offending input; returns the arrays."""
    bindings = {b.name: b for b in program.inputs}
    unknown = [k for k in arrays if k not in bindings]
    if unknown:
        known = ", ".join(bindings) or "none"
        raise UsageError(f"unknown input {unknown[0]!r}: the program's inputs are {known}")
    missing = [b for b in _required(program) if b.name not in arrays]
    if missing:
        need = ", ".join(f"{b.name} {tuple(b.shape)} {b.dtype}" for b in missing)
        raise UsageError(f"missing input {missing[0].name!r}: give --input NAME=FILE.npy for "
                         f"each of: {need}")
    for name, value in arrays.items():
        try:
            encode_input(bindings[name], value)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return dict(arrays)


def _zero_inputs(program: Program) -> dict[str, np.ndarray]:
    return {b.name: np.zeros(b.shape, dtype=b.dtype) for b in _required(program)}


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------

def execute(program: Program, inputs: Mapping[str, np.ndarray] | None, *,
            engine: str = "numba", watchdog: int | None = None,
            progress: bool = False) -> RunResult:
    """Run ``program`` on the chosen executor (``"numba"`` or ``"reference"``); raises
    :class:`NPUFault` on a machine fault and :class:`UsageError` when the executor refuses the
    inputs or options."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; engines are {', '.join(ENGINES)}")
    from npu.runtime import run
    try:
        return run(program, dict(inputs or {}), engine=engine, watchdog=watchdog,
                   progress=progress)
    except ValueError as exc:  # inputs the executor refused (io.initial_state), bad options
        raise UsageError(str(exc)) from None


def describe_fault(fault: NPUFault, program: Program) -> str:
    """The fault as text: code, cycle, the instruction with its disassembly and region."""
    lines = [f"fault {fault.code.name} (code {int(fault.code)}) at cycle {fault.cycle:,}"]
    i = fault.index
    n = program.n_instructions
    if 0 <= i < n:
        try:
            from npu.asm import format_instruction
            text = format_instruction(decode(program.instructions[i].astype("<u8").tobytes()))
        except ISAError as exc:
            words = " ".join(f"{int(w):016x}" for w in program.instructions[i])
            text = f"<illegal: {exc}> words {words}"
        region = program.region_of(i) or "(unlabelled)"
        lines.append(f"  instruction {i} in region {region!r}: {text}")
    elif i >= n:
        lines.append(f"  instruction {i}: past the end of the program ({n} instructions)")
    if fault.detail:
        lines.append(f"  detail: {fault.detail}")
    return "\n".join(lines)


def profile_result(result: RunResult, args: argparse.Namespace | None = None, *,
                   out: Any = None) -> Any:
    """Print the profile table of ``result`` and write what ``args`` asks for: ``trace``
    (Perfetto JSON), ``plot`` (PNG), ``json`` (profile JSON); ``top`` sets how many of the
    longest stalls are listed and ``name`` (or the file name of ``program``) titles it.
    Missing attributes mean "not requested", so any Namespace works. Returns the
    :class:`~npu.runtime.profile.Profile`. Raises :class:`UsageError` when a file cannot be
    written."""
    from npu.runtime.profile import Profile

    out = out or sys.stdout
    ns = args if args is not None else argparse.Namespace()
    name = getattr(ns, "name", None)
    if not name and getattr(ns, "program", None):
        name = Path(ns.program).name
    prof = Profile.from_result(result, name=name or None)
    print(prof.table(top_stalls=getattr(ns, "top", 5)), file=out)
    written = []
    for attr, what, write in (("trace", "Perfetto trace", prof.write_perfetto),
                              ("json", "profile JSON", prof.to_json),
                              ("plot", "plot", prof.plot)):
        path = getattr(ns, attr, None)
        if not path:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write(path)
        except OSError as exc:
            raise UsageError(f"cannot write {what} {str(path)!r}: "
                             f"{exc.strerror or exc}") from None
        written.append(f"wrote {what} to {path}")
    if written:
        print("", file=out)
        for line in written:
            print(line, file=out)
        if getattr(ns, "trace", None):
            print("  (open it at https://ui.perfetto.dev; 1 us on its time axis = 1 cycle)",
                  file=out)
    return prof


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if args.progress is None else bool(args.progress)


def _fail(command: str, exc: Exception) -> int:
    print(f"npu {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _load_program(path: str) -> Program:
    if not Path(path).is_file():
        raise UsageError(f"program file {path!r} not found")
    return load(path)


def cmd_run(args: argparse.Namespace) -> int:
    """``npu run``: execute, write outputs, print cycles and a summary."""
    try:
        program = _load_program(args.program)
        inputs = check_inputs(program, parse_inputs(args.input))
        try:
            result = execute(program, inputs, engine=args.engine, watchdog=args.watchdog,
                             progress=_progress(args))
        except NPUFault as fault:
            print(f"npu run: {args.program}: " + describe_fault(fault, program),
                  file=sys.stderr)
            return EXIT_FAULT
        from npu.runtime.profile import Profile
        prof = Profile.from_result(result, name=Path(args.program).name)
        cfg = program.config
        print(f"{args.program}: {result.cycles:,} cycles on {cfg.name} ({args.engine} engine), "
              f"{program.n_instructions:,} instructions")
        print(f"  MACs {prof.macs:,}   array utilization {100 * prof.utilization:.1f}%   "
              f"DRAM read {prof.dram_read:,} B   written {prof.dram_write:,} B")
        outputs = result.outputs()
        out_dir = Path(args.output_dir) if args.output_dir else None
        if out_dir is not None:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create output directory {str(out_dir)!r}: "
                                 f"{exc.strerror or exc}") from None
        for name, value in outputs.items():
            line = f"  output {name} {tuple(value.shape)} {value.dtype}"
            if out_dir is not None:
                path = out_dir / f"{name}.npy"
                try:
                    np.save(path, value, allow_pickle=False)
                except OSError as exc:
                    raise UsageError(f"cannot write {str(path)!r}: "
                                     f"{exc.strerror or exc}") from None
                line += f" -> {path}"
            print(line)
        if outputs and out_dir is None:
            print("  (pass --output-dir DIR to save the outputs as DIR/NAME.npy)")
        return 0
    except UsageError as exc:
        return _fail("run", exc)


def cmd_profile(args: argparse.Namespace) -> int:
    """``npu profile``: execute (or hand over to a registered source), then profile."""
    program: Program | None = None
    try:
        source = _SOURCES.get(Path(args.program).suffix.lower())
        try:
            if source is not None:
                result = source.run(args)
            else:
                if Path(args.program).suffix.lower() == ".onnx":
                    raise UsageError(f"{args.program!r} is a model: profiling ONNX needs the "
                                     f"compiler (npu.compiler), which is not installed")
                program = _load_program(args.program)
                arrays = parse_inputs(args.input)
                if not arrays and _required(program):
                    inputs = _zero_inputs(program)
                    print(f"note: no --input given; feeding zeros to {', '.join(inputs)} "
                          f"(timing does not depend on the data)", file=sys.stderr)
                else:
                    inputs = check_inputs(program, arrays)
                result = execute(program, inputs, engine=args.engine, watchdog=args.watchdog,
                                 progress=_progress(args))
        except NPUFault as fault:
            where = describe_fault(fault, program) if program is not None else str(fault)
            print(f"npu profile: {args.program}: {where}", file=sys.stderr)
            return EXIT_FAULT
        profile_result(result, args)
        return 0
    except UsageError as exc:
        return _fail("profile", exc)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input tensor (repeat for each input); its shape must match the "
                        "program's binding, integers are converted when they fit its dtype")
    p.add_argument("--engine", choices=ENGINES, default="numba",
                   help="executor: the fast numba engine (default) or the numpy reference "
                        "interpreter (slow, the oracle); both are cycle-identical")
    p.add_argument("--watchdog", type=_positive, metavar="CYCLES",
                   help="fault with WATCHDOG if the program has not ended after this many "
                        "cycles (default: the config's watchdog_cycles)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on long runs (default: when stderr is a terminal)")


def add_parser(subparsers: Any) -> None:
    """Register ``run`` and ``profile``."""
    p = subparsers.add_parser(
        "run", help="execute a program file on the cycle-exact simulator",
        description="Execute a .npub program with the given inputs, print its cycle count and "
                    "a short summary, and write each output as DIR/NAME.npy. Exit status: 0 "
                    "ok, 2 bad program/input, 3 machine fault (code, cycle and faulting "
                    "instruction are printed).",
        epilog="example: npu run gemm.npub --input a=a.npy --input b=b.npy --output-dir out")
    p.add_argument("program", help="program file (.npub)")
    _common(p)
    p.add_argument("-o", "--output-dir", metavar="DIR",
                   help="write every output as DIR/NAME.npy (created if missing)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser(
        "profile", help="execute a program and profile where the cycles went",
        description="Execute a program and print its profile: per region (layer) cycles, "
                    "MACs, array utilization, DRAM traffic, arithmetic intensity and bound; per "
                    "engine busy/stalled/idle cycles and stalls by reason; the longest stalls. "
                    "Optionally write a Perfetto timeline, a PNG and the profile as JSON. "
                    "Without --input, zeros are fed (timing does not depend on the data). "
                    "docs/profiling.md explains every figure.",
        epilog="example: npu profile gemm.npub --trace trace.json --plot profile.png")
    p.add_argument("program", help="program file (.npub); a model (.onnx) once the compiler "
                                   "registers it")
    _common(p)
    p.add_argument("--trace", metavar="TRACE.json",
                   help="write a Chrome-trace/Perfetto timeline (open in ui.perfetto.dev)")
    p.add_argument("--plot", metavar="PROFILE.png",
                   help="write a PNG: engine timeline, utilization per region, roofline")
    p.add_argument("--json", metavar="PROFILE.json", help="write the profile as JSON")
    p.add_argument("--top", type=int, default=5, metavar="N",
                   help="list the N longest stalls (default 5; 0: none)")
    p.set_defaults(func=cmd_profile)
    _PROFILE_PARSER.append(p)
    for source in _SOURCES.values():
        if source.add_arguments is not None:
            source.add_arguments(p)
