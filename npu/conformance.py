"""The conformance corpus: programs the RTL and the runtime must agree on, and its coverage.

Three sources (:func:`random_cases`, :func:`example_cases`, :func:`compiled_cases`):

* random race-free programs from :mod:`npu.randprog`, in categories: ``mixed`` (every kind,
  1..150 instructions, boundary probability 0.05/0.2/0.5), ``kinds`` (random subsets of the
  instruction kinds, so that rare interactions get dense), ``long`` (150..250 instructions,
  full queues and deep token counts), and ``fault/<CODE>`` (programs built to fault with each
  fault code: illegal instruction, out-of-range address, token deadlock, watchdog, token
  overflow);
* the examples: ``examples/hello.s`` and the tiled GEMM of ``examples/gemm.py`` at sizes with
  full and partial tiles;
* compiled models: every small model of ``npu.models.zoo`` compiled for the config, each NPU
  segment a case (skipped, with the reason, while the compiler or a model is unavailable).

Every case is deterministic in (config, seed, index), so a failure is reproduced with
``npu conformance --seed S --only NAME``. :func:`corpus_coverage` measures what the corpus
exercised (instruction kinds and features, token pairs, stall reasons, queue-full dispatch,
boundary addresses, fault codes and variants), from the programs and the runtime's traces.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from npu.coverage import Coverage
from npu.isa import (
    LAYOUTS,
    EltFunc,
    Engine,
    Fault,
    Mem,
    NPUConfig,
    Opcode,
    address_error,
    footprint,
    get_config,
    static_faults,
)
from npu.program import Program
from npu.randprog import FAULT_KINDS, KINDS, fault_program, random_inputs, random_program
from npu.verify import Case, Expected, Verdict, verify_cases

__all__ = ["random_cases", "example_cases", "compiled_cases", "corpus_coverage",
           "sample_coverage", "run_conformance", "summary_line", "EXAMPLES_DIR"]

#: The repository's examples folder (a source checkout or editable install).
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
#: Share of each random category (fault share split evenly over the fault codes).
MIX = (("mixed", 0.55), ("kinds", 0.15), ("long", 0.05), ("fault", 0.25))
#: Zoo models compiled into the corpus: the small ones (the others take too many cycles for an
#: RTL simulation; the runtime-only tests cover them).
COMPILED_MODELS = ("digits_cnn", "mlp_784", "gaussian_blur", "moving_average", "gcn_karate",
                   "graphsage_karate", "gin_karate")


def _category(i: int, count: int) -> str:
    """Category of random case ``i`` of ``count``: deterministic, proportions of :data:`MIX`."""
    x = (i + 0.5) / count
    acc = 0.0
    for name, share in MIX:
        acc += share
        if x < acc:
            if name == "fault":
                lo = acc - share
                k = min(int((x - lo) / share * len(FAULT_KINDS)), len(FAULT_KINDS) - 1)
                return f"fault/{FAULT_KINDS[k].name}"
            return name
    return f"fault/{FAULT_KINDS[-1].name}"


def random_case(config: str | NPUConfig, seed: int, i: int, count: int) -> Case:
    """Random case ``i`` of a corpus of ``count`` for ``config`` and ``seed``."""
    cfg = get_config(config)
    cat = _category(i, count)
    rng = np.random.default_rng([seed, i, sum(cfg.name.encode())])
    name = f"{cfg.name}/{cat}/{i}"
    if cat.startswith("fault/"):
        code = Fault[cat.split("/")[1]]
        prog = fault_program(rng, cfg, code)
        return Case(name, prog, random_inputs(rng, prog), validate=False, category=cat)
    if cat == "kinds":
        size = int(rng.integers(1, 5))
        kinds = [KINDS[k] for k in rng.choice(len(KINDS), size, replace=False)]
        n = int(rng.integers(1, 80))
        prog = random_program(rng, cfg, n, kinds, boundary=float(rng.choice([0.05, 0.3])))
    elif cat == "long":
        n = int(rng.integers(150, min(251, cfg.token_max)))
        prog = random_program(rng, cfg, n, boundary=0.1)
    else:
        n = int(rng.integers(1, 151))
        prog = random_program(rng, cfg, n, boundary=float(rng.choice([0.05, 0.2, 0.5])))
    return Case(name, prog, random_inputs(rng, prog), category=cat)


def random_cases(config: str | NPUConfig, count: int, seed: int = 0) -> list[Case]:
    """``count`` random cases for ``config`` in the proportions of :data:`MIX`, plus
    :data:`RACES` fault-race cases per hundred (at least one of each kind)."""
    cases = [random_case(config, seed, i, count) for i in range(count)]
    n_race = max(len(RACE_KINDS), count // 100 * RACES)
    return cases + [gather_race_case(config, seed, i) for i in range(n_race)]


#: Fault-race cases per hundred random cases.
RACES = 1
#: What follows the faulting GATHER in a race case.
RACE_KINDS = ("illegal", "bad_address", "watchdog", "overflow")


def gather_race_case(config: str | NPUConfig, seed: int, i: int) -> Case:
    """A GATHER whose index selects a row outside DRAM, followed by a second fault that the
    hardware meets before it has read that index: an illegal instruction or a static
    out-of-range address dispatched right after, a watchdog limit, or a token overflow.

    The contract dates the GATHER's fault at its start cycle, so it wins on both sides; an
    implementation that only learns of the bad index when it fetches the row must not let the
    later fault through first.
    """
    from npu.builder import ProgramBuilder

    cfg = get_config(config)
    kind = RACE_KINDS[i % len(RACE_KINDS)]
    rng = np.random.default_rng([seed, i, 7919])
    n = cfg.gather_max if kind == "overflow" else int(rng.integers(1, min(cfg.gather_max, 32) + 1))
    if kind == "watchdog":   # a limit after the GATHER's start, before it reads its indices
        limit = int(rng.integers(2, 4 * n // cfg.dram_beat_bytes + cfg.dram_latency + 2))
        cfg = dataclasses.replace(cfg, watchdog_cycles=limit)
    b = ProgramBuilder(cfg, dram_bytes=cfg.acc_row_bytes * 8 + 4 * cfg.gather_max)
    bad = n - 1 if kind == "overflow" else int(rng.integers(0, n))
    rows = np.zeros(n, dtype="<i4")
    rows[bad] = int(rng.choice([-1, 1 << 20]))
    idx = b.segment("indices", rows.view(np.uint8), addr=cfg.acc_row_bytes * 8)
    b.segment("table", rng.integers(0, 256, cfg.acc_row_bytes * 8, dtype=np.uint8), addr=0)
    b.gather(dram_addr=0, index_addr=idx, row_stride=cfg.acc_row_bytes, dst=0, n=n,
             row_bytes=cfg.spad_row_bytes)
    raw: dict[int, list[int]] = {}
    if kind == "illegal":
        raw[b.sync("EX")] = [0xF, 0, 0, 0]
    elif kind == "bad_address":
        b.load(dram_addr=0, dram_stride_inner=0, dst=cfg.spad_rows, n_inner=1, row_bytes=1)
    elif kind == "overflow":
        for _ in range(cfg.token_max + 1):
            b.sync("EX", signal="VX")
    prog = b.build(validate=False, metadata={"fault": "race", "variant": f"gather_{kind}"})
    for k, word in raw.items():
        prog.instructions[k] = word
    return Case(f"{cfg.name}/fault/race/{kind}/{i}", prog, validate=False, category="fault/race")


def _gemm_module() -> Any:
    path = EXAMPLES_DIR / "gemm.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("npu_example_gemm", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


#: GEMM sizes of the example cases: a single tile, partial tiles, several blocks.
GEMM_SIZES = ((1, 1, 1), (16, 16, 16), (33, 40, 24), (64, 64, 64), (100, 48, 72))


def example_cases(config: str | NPUConfig, *, big: bool = False) -> list[Case]:
    """The examples for ``config``: the GEMM at :data:`GEMM_SIZES` (scaled to the array; with
    ``big`` also 256^3) and ``examples/hello.s`` when it was written for ``config``."""
    cfg = get_config(config)
    cases = []
    gemm = _gemm_module()
    if gemm is not None:
        scale = max(1, cfg.rows // 16)
        sizes = [tuple(max(1, d * scale) if d > 1 else d for d in s) for s in GEMM_SIZES]
        if big:
            sizes.append((256, 256, 256))
        for seed, (m, k, n) in enumerate(sizes):
            prog, inputs, _ = gemm.build_gemm(cfg, m, k, n, seed)
            cases.append(Case(f"{cfg.name}/example/gemm{m}x{k}x{n}", prog, inputs,
                              category="example"))
    hello = EXAMPLES_DIR / "hello.s"
    if hello.exists():
        from npu.asm import assemble_file
        prog = assemble_file(hello)
        if prog.config == cfg:
            rng = np.random.default_rng(0)
            cases.append(Case(f"{cfg.name}/example/hello", prog, random_inputs(rng, prog),
                              category="example"))
    return cases


def compiled_cases(config: str | NPUConfig, models: Sequence[str] = COMPILED_MODELS, *,
                   max_cycles: int = 400_000, say: Callable[[str], None] = print
                   ) -> list[Case]:
    """Each NPU segment of each model in ``models`` compiled for ``config``, with random
    inputs; segments over ``max_cycles`` cycles (on the runtime) are left out and said so."""
    cfg = get_config(config)
    try:
        from npu.compiler.pipeline import compile_model
        from npu.models.zoo import MODELS, calibration_data
        from npu.runtime import NPUFault, run
    except ImportError as exc:
        say(f"compiled models skipped: {exc}")
        return []
    cases = []
    for name in models:
        if name not in MODELS:
            say(f"compiled model {name} skipped: not in the zoo")
            continue
        try:
            compiled = compile_model(MODELS[name](), cfg, calibration_data(name, 4))
        except Exception as exc:  # noqa: BLE001 - a compiler gap skips one model, said so
            say(f"compiled model {name} skipped: {type(exc).__name__}: {exc}")
            continue
        for k, prog in enumerate(compiled.programs):
            if prog is None:
                continue
            rng = np.random.default_rng([k, len(name)])
            # int32 inputs are row indices (GNN neighbour lists): 0 is always a valid row.
            inputs = {b: (np.zeros_like(v) if v.dtype == np.int32 else v)
                      for b, v in random_inputs(rng, prog).items()}
            try:
                cycles = run(prog, inputs).cycles
            except NPUFault as exc:
                say(f"compiled model {name} segment {k} faults on the runtime: {exc}")
                cycles = 0
            if cycles > max_cycles:
                say(f"compiled model {name} segment {k}: {cycles} cycles > {max_cycles}, "
                    f"left out")
                continue
            cases.append(Case(f"{cfg.name}/compiled/{name}/{k}", prog, inputs,
                              category="compiled"))
    return cases


# --------------------------------------------------------------------------------------------
# Coverage of the corpus
# --------------------------------------------------------------------------------------------

_ELT = LAYOUTS[Opcode.ELTWISE]
_PAIRS = [f"{a.name}->{b.name}" for a in Engine for b in Engine if a != b]
_FEATURES = {
    Opcode.LOAD: ("spad", "acc", "fill", "2d", "partial_row", "n1"),
    Opcode.GATHER: ("spad", "acc", "n1", "partial_row"),
    Opcode.PRELOAD: ("plain",),
    Opcode.MATMUL: ("overwrite", "accumulate", "swap", "2d", "strided", "n1"),
    Opcode.VECTOR: ("plain", "relu_clamp", "n1", "fixed_point", "fp32"),
    Opcode.ELTWISE: ("add", "max", "in_place", "2d", "n1", "add_mult_max", "add_shift_max"),
    Opcode.STORE: ("spad", "acc", "2d", "partial_row", "n1"),
    Opcode.SYNC: tuple(e.name for e in Engine),
    Opcode.BARRIER: ("plain",),
    Opcode.HALT: ("plain",),
}


def _features(op: Opcode, f: dict[str, int], cfg: NPUConfig) -> list[str]:
    out = []
    if op in (Opcode.LOAD, Opcode.GATHER, Opcode.STORE):
        out.append("acc" if f["mem"] == Mem.ACC else "spad")
        if f["row_bytes"] < cfg.mem_row_bytes(f["mem"]):
            out.append("partial_row")
    if op == Opcode.LOAD and f["fill"]:
        out.append("fill")
    if op in (Opcode.LOAD, Opcode.STORE, Opcode.MATMUL, Opcode.ELTWISE) and f["n_outer"] > 1:
        out.append("2d")
    n = f.get("n", f.get("n_inner", 1) * f.get("n_outer", 1))
    if op in (Opcode.LOAD, Opcode.GATHER, Opcode.STORE, Opcode.MATMUL, Opcode.VECTOR,
              Opcode.ELTWISE) and n == 1:
        out.append("n1")
    if op == Opcode.MATMUL:
        out.append("accumulate" if f["accumulate"] else "overwrite")
        if f["swap"]:
            out.append("swap")
        if f["spad_stride_inner"] != 1:
            out.append("strided")
    if op == Opcode.VECTOR:
        out.append("relu_clamp" if (f["clamp_min"] > -128 or f["clamp_max"] < 127) else "plain")
        out.append("fp32" if f["fp32"] else "fixed_point")
    if op == Opcode.ELTWISE:
        out.append("add" if f["func"] == EltFunc.ADD else "max")
        if f["func"] == EltFunc.ADD:  # the edges of the ADD fields' ranges (MAX ignores them)
            if max(f["a_mult"], f["b_mult"]) == _ELT["a_mult"].hi:
                out.append("add_mult_max")
            if f["shift"] == _ELT["shift"].hi:
                out.append("add_shift_max")
        if f["dst"] in (f["a_addr"], f["b_addr"]):
            out.append("in_place")
    if op == Opcode.SYNC:
        out.append(Engine(f["engine"]).name)
    if op in (Opcode.PRELOAD, Opcode.BARRIER, Opcode.HALT):
        out.append("plain")
    return out


def corpus_coverage() -> Coverage:
    """The corpus covergroup (empty): what :func:`sample_coverage` fills in."""
    cov = Coverage("conformance corpus")
    cov.point("opcode", [op.name for op in Opcode])
    cov.point("feature", [f"{op.name}.{x}" for op, feats in _FEATURES.items() for x in feats])
    cov.point("wait", _PAIRS)
    cov.point("signal", _PAIRS)
    cov.point("stall", ["NONE", "UNIT", "TOKEN", "BANK", "PRELOAD", "RETIRE", "HAZARD"])
    cov.point("dispatch", ["queue_full", "barrier_wait", "back_to_back"])
    cov.point("boundary", ["spad_last_row", "acc_last_row", "dram_last_byte"])
    cov.point("outcome", ["done"] + [f.name for f in FAULT_KINDS])
    cov.point("fault_variant", ["no_halt", "opcode", "reserved", "own_engine",
                                "barrier_tokens", "static", "gather_index", "unpaired_wait",
                                "sync_cycle", "limit", "unmatched_signals"]
              + [f"gather_{k}" for k in RACE_KINDS])
    cov.point("config", ["npu4", "npu8", "npu16"])
    cov.point("length", {"1-10": lambda n: n <= 10, "11-100": lambda n: 10 < n <= 100,
                         "101-255": lambda n: 100 < n <= 255, ">255": lambda n: n > 255})
    cov.cross("outcome x config", ("outcome", "config"),
              waive={f"{f.name} x npu16": "fault programs run on npu4/npu8 only (the npu16 "
                                          "corpus is examples and compiled models)"
                     for f in FAULT_KINDS})
    return cov


def sample_coverage(cov: Coverage, case: Case, exp: Expected | None) -> None:
    """Add one case (and the runtime's outcome of it) to the corpus coverage."""
    prog = case.program
    cfg = prog.config
    sample: dict[str, Any] = {"config": cfg.name, "length": prog.n_instructions}
    if case.program.metadata.get("variant"):
        sample["fault_variant"] = prog.metadata["variant"]
    if exp is not None:
        sample["outcome"] = "done" if exp.result is not None else exp.fault.code.name
    cov.sample(**sample)
    faults = static_faults(prog.instructions, cfg, prog.dram_bytes)
    ok = np.flatnonzero(faults == 0)
    instrs = []
    for i in ok.tolist():
        try:
            instrs.append((i, _decode(prog, i)))
        except ValueError:
            continue
    limits = {"dram": prog.dram_bytes, "spad": cfg.spad_rows, "acc": cfg.acc_rows}
    boundary_names = {"dram": "dram_last_byte", "spad": "spad_last_row",
                      "acc": "acc_last_row"}
    for _, ins in instrs:
        cov.sample(opcode=ins.opcode.name)
        for feat in _features(ins.opcode, dict(ins.fields), cfg):
            cov.sample(feature=f"{ins.opcode.name}.{feat}")
        for a in Engine:
            if ins.engine is not None:
                if ins.wait >> a & 1:
                    cov.sample(wait=f"{a.name}->{ins.engine.name}")
                if ins.signal >> a & 1:
                    cov.sample(signal=f"{ins.engine.name}->{a.name}")
        if address_error(ins, cfg, prog.dram_bytes) is None:
            for space, _first, end in footprint(ins, cfg):
                if end == limits[space]:
                    cov.sample(boundary=boundary_names[space])
    if exp is None or exp.result is None:
        return
    tr = exp.result.trace
    for s in np.unique(tr.stall[tr.start >= 0]).tolist():
        cov.sample(stall=["NONE", "UNIT", "TOKEN", "BANK", "PRELOAD", "RETIRE", "HAZARD"][s])
    d = tr.dispatch
    gaps = np.flatnonzero(d[1:] > d[:-1] + 1) + 1
    ops = prog.instructions[:, 0] & np.uint64(0xF)
    for g in gaps.tolist():
        cov.sample(dispatch="barrier_wait" if int(ops[g]) == Opcode.BARRIER else "queue_full")
    if (d[1:] == d[:-1] + 1).any():
        cov.sample(dispatch="back_to_back")


def _decode(prog: Program, i: int) -> Any:
    from npu.isa import decode
    return decode(prog.instructions[i].astype("<u8").tobytes())


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def summary_line(verdicts: Sequence[Verdict]) -> str:
    """``conformance passed=<n> failed=<m> cycle_mismatches=<k>``."""
    passed = sum(v.ok for v in verdicts)
    mism = sum(v.cycle_mismatch for v in verdicts)
    return f"conformance passed={passed} failed={len(verdicts) - passed} cycle_mismatches={mism}"


def run_conformance(args: argparse.Namespace) -> int:
    """``npu conformance``: build the corpus, verify it, print failures, the per-category
    table, coverage, speed figures, and the summary line last."""
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    cases: list[Case] = []
    for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
        cases += random_cases(name, args.count, args.seed)
        cases += example_cases(name)
    if not args.no_compiled:
        cases += example_cases(args.compiled_config, big=True)
        cases += compiled_cases(args.compiled_config, say=say)
    if getattr(args, "only", None):
        cases = [c for c in cases if args.only in c.name]
    say(f"corpus: {len(cases)} cases ({time.perf_counter() - t0:.1f} s to build)")
    expected_for_cov: dict[str, Expected] = {}
    verdicts = verify_cases(cases, sim=args.sim, engine=args.engine, batch=args.batch,
                            jobs=args.jobs, progress=say, keep_expected=expected_for_cov)
    failed = [v for v in verdicts if not v.ok]
    for v in (verdicts if args.verbose else failed):
        print(v.report())
    # Per-category table.
    by_cat: dict[str, Counter] = {}
    for v in verdicts:
        c = by_cat.setdefault(v.category or "?", Counter())
        c["cases"] += 1
        c["passed"] += v.ok
        c["cycle_mismatch"] += v.cycle_mismatch
        c["sim_cycles"] += v.sim_cycles
        c["rtl_s"] += v.rtl_run_s
    print(f"{'category':24s} {'cases':>6s} {'passed':>7s} {'cyc.mism':>8s} {'RTL cycles':>11s} "
          f"{'RTL s':>7s}")
    for cat in sorted(by_cat):
        c = by_cat[cat]
        print(f"{cat:24s} {c['cases']:6d} {c['passed']:7d} {c['cycle_mismatch']:8d} "
              f"{c['sim_cycles']:11d} {c['rtl_s']:7.1f}")
    cov = corpus_coverage()
    by_name = {c.name: c for c in cases}
    for v in verdicts:
        sample_coverage(cov, by_name[v.name], expected_for_cov.get(v.name))
    print(cov.report())
    with contextlib.suppress(OSError):
        from npu.verify import build_root
        (build_root() / "coverage").mkdir(parents=True, exist_ok=True)
        (build_root() / "coverage" / "conformance.txt").write_text(cov.report() + "\n")
    sim_cycles = sum(v.sim_cycles for v in verdicts)
    rtl_s = sum(v.rtl_run_s for v in verdicts)
    rtl_total = sum(v.rtl_total_s for v in verdicts)
    rt_s = sum(v.runtime_s for v in verdicts)
    print(f"RTL: {sim_cycles:,} cycles simulated in {rtl_s:.1f} s "
          f"({sim_cycles / max(rtl_s, 1e-9):,.0f} cycles/s; with load and read-back "
          f"{rtl_total:.1f} s); runtime {rt_s:.1f} s; wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([v.__dict__ for v in verdicts], indent=1,
                                              default=str))
    print(summary_line(verdicts))
    return 0 if not failed else 1
