"""The numba engine against the reference interpreter on random programs: identical memories,
total cycles, every Trace array (dispatch, ready, start, complete, retire, stall, engine) and
identical faults (code, cycle, index).

Programs come from :mod:`npu.randprog` (valid, race-free programs covering every instruction
kind, and programs provoking each fault). The seeded loops print the seed of any mismatch, which
reproduces it with ``random_program(np.random.default_rng(seed), config, n)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from npu.randprog import (
    FAULT_KINDS,
    fault_program,
    program_strategy,
    random_inputs,
    random_program,
)
from npu.runtime import NPUFault, RunResult, run
from npu.runtime.reference import run_reference

TRACE_FIELDS = ("dispatch", "ready", "start", "complete", "retire", "stall", "engine")
CONFIGS = ("npu4", "npu8")


def _outcome(runner, program, inputs, **kw) -> RunResult | tuple[int, int, int]:
    try:
        return runner(program, inputs, **kw)
    except NPUFault as exc:
        return exc.key()


def mismatch(program, inputs, **kw) -> str | None:
    """Run both executors; describe the first difference, or None when they agree."""
    a = _outcome(run, program, inputs, **kw)
    b = _outcome(run_reference, program, inputs, **kw)
    if isinstance(a, tuple) or isinstance(b, tuple):
        return None if a == b else f"fault/result numba={a!r} reference={b!r}"
    if a.cycles != b.cycles:
        return f"cycles numba={a.cycles} reference={b.cycles}"
    for name in TRACE_FIELDS:
        x, y = getattr(a.trace, name), getattr(b.trace, name)
        if not np.array_equal(x, y):
            i = int(np.flatnonzero(x != y)[0])
            return f"trace.{name}[{i}] numba={x[i]} reference={y[i]}"
    for name in ("dram", "spad", "acc"):
        x, y = getattr(a, name), getattr(b, name)
        if not np.array_equal(x, y):
            i = np.argwhere(x != y)[0]
            return f"{name}{list(i)} numba={x[tuple(i)]} reference={y[tuple(i)]}"
    return None


def _random_batch(config: str, seeds: range, max_n: int) -> list[str]:
    bad = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        prog = random_program(rng, config, int(rng.integers(1, max_n + 1)))
        why = mismatch(prog, random_inputs(rng, prog))
        if why:
            bad.append(f"seed {seed} ({config}, {prog.n_instructions} instructions): {why}")
    return bad


def _fault_batch(config: str, seeds: range) -> list[str]:
    bad = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        kind = FAULT_KINDS[seed % len(FAULT_KINDS)]
        prog = fault_program(rng, config, kind)
        inputs = random_inputs(rng, prog)
        a = _outcome(run, prog, inputs, validate=False)
        if not isinstance(a, tuple) or a[0] != int(kind):
            bad.append(f"seed {seed} ({config}, {kind.name}/{prog.metadata['variant']}): "
                       f"numba gave {a!r}")
            continue
        why = mismatch(prog, inputs, validate=False)
        if why:
            bad.append(f"seed {seed} ({config}, {kind.name}/{prog.metadata['variant']}): {why}")
    return bad


CHUNK = 150


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("chunk", range(5))
def test_random_programs_agree(config: str, chunk: int) -> None:
    """5 x 150 random programs of 1..60 instructions per config (1500 in all)."""
    bad = _random_batch(config, range(chunk * CHUNK, (chunk + 1) * CHUNK), 60)
    assert not bad, "\n".join(bad[:10])


@pytest.mark.parametrize("config", CONFIGS)
def test_fault_programs_agree(config: str) -> None:
    """200 programs per config faulting in every way (code, cycle and index agree)."""
    bad = _fault_batch(config, range(10_000, 10_200))
    assert not bad, "\n".join(bad[:10])


@pytest.mark.parametrize("config", CONFIGS)
def test_unvalidated_valid_programs_agree(config: str) -> None:
    """validate=False changes nothing for a valid program (static fault flags all clear)."""
    for seed in range(20_000, 20_040):
        rng = np.random.default_rng(seed)
        prog = random_program(rng, config, 40)
        inputs = random_inputs(rng, prog)
        ok = run(prog, inputs)
        unchecked = run(prog, inputs, validate=False)
        assert ok.cycles == unchecked.cycles and ok.trace.equal(unchecked.trace)
        assert np.array_equal(ok.dram, unchecked.dram)
        assert mismatch(prog, inputs, validate=False) is None, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=program_strategy("npu4", 1, 50))
def test_hypothesis_programs_agree(pair) -> None:
    """The same property through hypothesis (which shrinks the seed and length)."""
    program, inputs = pair
    assert mismatch(program, inputs) is None


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_many_more_random_programs_agree(config: str) -> None:
    """2000 more random programs per config, up to 200 instructions, and 500 fault programs
    (a few minutes per config)."""
    bad = _random_batch(config, range(100_000, 102_000), 200)
    bad += _fault_batch(config, range(200_000, 200_500))
    assert not bad, "\n".join(bad[:10])
