"""Shared pieces of the cocotb block testbenches (loaded by the simulator's Python).

* :func:`params` — what the pytest launcher passes (config, cycle counts) through
  ``NPU_TB_PARAMS`` (JSON);
* :func:`make_rng` — the seeded random source: ``NPU_TB_SEED`` if set (to reproduce a failure),
  else a fresh seed; either way it is logged, and :func:`fail` puts it in every error message;
* :func:`start` — clock and reset;
* :func:`finish_coverage` — saves a block's coverage where the launcher reads it
  (``NPU_TB_COVERAGE``) and logs the report;
* lane packing helpers for the packed array ports.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge

from npu.coverage import Coverage
from npu.isa import NPUConfig

PERIOD_NS = 10
_SEED: list[int] = []


def params() -> dict[str, Any]:
    return json.loads(os.environ.get("NPU_TB_PARAMS", "{}"))


def bench_config(p: dict[str, Any]) -> NPUConfig:
    """The NPUConfig among the bench parameters (the rest are stimulus settings)."""
    return NPUConfig.from_dict({k: v for k, v in p.items()
                                if k in NPUConfig.__dataclass_fields__})


def make_rng(log: Any) -> np.random.Generator:
    """The testbench's random source; its seed is logged and kept for :func:`fail`."""
    env = os.environ.get("NPU_TB_SEED", "")
    seed = int(env) if env else random.SystemRandom().randrange(1 << 31)
    _SEED[:] = [seed]
    log.info("random seed %d (reproduce with NPU_TB_SEED=%d)", seed, seed)
    return np.random.default_rng(seed)


def fail(message: str) -> AssertionError:
    """An assertion naming the seed that reproduces it."""
    seed = _SEED[0] if _SEED else None
    return AssertionError(f"{message} [seed {seed}: reproduce with NPU_TB_SEED={seed}]")


async def start(dut: Any, reset_cycles: int = 2) -> None:
    """Start the clock and hold reset for ``reset_cycles`` cycles."""
    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.rst.value = 1
    for _ in range(reset_cycles):
        await RisingEdge(dut.clk)
    dut.rst.value = 0


def finish_coverage(cov: Coverage, log: Any) -> None:
    """Save the coverage for the launcher and log its report."""
    path = os.environ.get("NPU_TB_COVERAGE")
    if path:
        cov.save(path)
    log.info("\n%s", cov.report())


def pack(values: Any, bits: int) -> int:
    """Lane 0 in the low bits; values are two's complement in ``bits`` each."""
    out = 0
    mask = (1 << bits) - 1
    for i, v in enumerate(np.asarray(values).ravel().tolist()):
        out |= (int(v) & mask) << (bits * i)
    return out


def unpack(value: int, lanes: int, bits: int, signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack`."""
    mask = (1 << bits) - 1
    out = [(value >> (bits * i)) & mask for i in range(lanes)]
    if signed:
        out = [v - (1 << bits) if v >> (bits - 1) else v for v in out]
    return np.array(out, dtype=np.int64)


def read_int(handle: Any) -> int:
    """A signal's value as an unsigned int (fast path through the raw bit string)."""
    try:
        return int(handle._handle.get_signal_val_binstr(), 2)
    except (AttributeError, ValueError):
        return int(handle.value)
