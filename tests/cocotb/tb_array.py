"""cocotb testbench of the systolic array (``npu.hw.array.SystolicArray``).

Driver: each cycle it may write one weight row of one bank and present one input vector with
a bank select, in phases of different densities. It keeps to the array's usage rule (the one
the timing contract's PRELOAD/MATMUL bank rules guarantee): a weight row is never rewritten
while a vector using that bank is passing through that row, and it probes both edges of the
rule (the write one cycle before a vector reaches the row; the first write after the last
vector left it).

Monitor + scoreboard: every cycle ``y`` is compared with the vector that entered
``rows + cols - 1`` cycles earlier: ``numerics.matmul(x, W[sel])``, with each weight row as it
was when the vector reached that row (zero when no vector entered).

Coverage: bank select and bank switches, input spacing, input and weight patterns, write timing
against use, result magnitude.
"""

from __future__ import annotations

from typing import Any

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge
from tbutil import fail, finish_coverage, make_rng, pack, params, read_int, start, unpack

from npu import numerics
from npu.coverage import Coverage


def coverage() -> Coverage:
    cov = Coverage("systolic array")
    cov.point("sel", [0, 1])
    cov.point("switch", ["same bank", "other bank"])
    cov.point("gap", {"back-to-back": lambda g: g == 0, "1-3": lambda g: 1 <= g <= 3,
                      ">3": lambda g: g > 3})
    cov.point("x", ["zeros", "all -128", "all 127", "random"])
    cov.point("w", ["zeros", "all -128", "all 127", "random"])
    cov.point("write timing", ["just before use", "right after last use",
                               "beside the other bank streaming"])
    cov.point("|y| max", {"0": lambda v: v == 0, "<2^14": lambda v: 0 < v < 1 << 14,
                          ">=2^14": lambda v: v >= 1 << 14,
                          "full scale": lambda v: v == 128 * 128 * 4})
    cov.cross("sel x switch", ("sel", "switch"))
    return cov


def _pattern(rng: np.random.Generator, n: int, kind: str | None = None
             ) -> tuple[str, np.ndarray]:
    kind = kind or str(rng.choice(["zeros", "all -128", "all 127", "random", "random",
                                   "random"]))
    if kind == "zeros":
        return kind, np.zeros(n, dtype=np.int64)
    if kind == "all -128":
        return kind, np.full(n, -128, dtype=np.int64)
    if kind == "all 127":
        return kind, np.full(n, 127, dtype=np.int64)
    return kind, rng.integers(-128, 128, n)


@cocotb.test()
async def array_random(dut: Any) -> None:
    """Constrained-random weights and inputs; y checked every cycle."""
    p = params()
    rows, cols = p["rows"], p["cols"]
    latency = rows + cols - 1
    cycles = p.get("amount", 4000)
    rng = make_rng(dut._log)
    cov = coverage()
    await start(dut)
    # Weight history: (bank, row) -> list of (cycle written, values); a vector reaching row k
    # at cycle u sees the last write at a cycle < u.
    hist: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {
        (b, k): [(-1, np.zeros(cols, dtype=np.int64))] for b in range(2) for k in range(rows)}
    vectors: list[tuple[int, np.ndarray, int]] = []      # (cycle entered, x, sel)
    entered: dict[int, tuple[int, np.ndarray, int]] = {}  # cycle due -> vector
    last_vec_t, last_sel = -10, -1
    burst: tuple[int, int] | None = None                  # (bank, next row) of a preload burst
    burst_kind: str | None = None
    phase_len = 0
    p_w = p_x = 0.0
    mismatches = 0

    def weights_at(b: int, k: int, u: int) -> np.ndarray:
        for t, vals in reversed(hist[b, k]):
            if t < u:
                return vals
        raise AssertionError("no weight history")

    def write_ok(b: int, k: int, t: int) -> bool:
        return all(not (tv + k <= t <= tv + k + cols - 1)
                   for tv, _x, s in vectors[-2 * latency:] if s == b)

    t = -1
    # Past `cycles`, stimulus goes on (up to 4x) while the coverage has holes.
    while t + 1 < cycles or (cov.missed() and t + 1 < 4 * cycles):
        t += 1
        if phase_len == 0:
            phase_len = int(rng.integers(20, 200))
            p_w, p_x = float(rng.choice([0.0, 0.1, 0.5, 1.0])), float(rng.choice([0.2, 0.6, 1.0]))
        phase_len -= 1
        # Weight write: continue a preload burst, or start one, or a single random row.
        w_en, w_bank, w_row, w_vals = 0, 0, 0, np.zeros(cols, dtype=np.int64)
        if burst is None and rng.random() < p_w:
            burst = (int(rng.integers(0, 2)), 0) if rng.random() < 0.7 else None
            # Half the bursts fill the bank with one pattern (full-scale results need it).
            burst_kind = str(rng.choice(["zeros", "all -128", "all 127"])) \
                if rng.random() < 0.5 else None
            if burst is None:
                w_bank, w_row = int(rng.integers(0, 2)), int(rng.integers(0, rows))
                if write_ok(w_bank, w_row, t):
                    w_en = 1
        if burst is not None:
            b, k = burst
            if write_ok(b, k, t):
                w_en, w_bank, w_row = 1, b, k
                burst = (b, k + 1) if k + 1 < rows else None
        if w_en:
            kind, w_vals = _pattern(rng, cols, burst_kind)
            hist[w_bank, w_row].append((t, w_vals))
            cov.sample(w=kind)
            users = [(tv, s) for tv, _x, s in vectors[-2 * latency:]]
            if any(s == w_bank and tv + w_row == t + 1 for tv, s in users):
                cov.sample(**{"write timing": "just before use"})
            if any(s == w_bank and tv + w_row + cols == t for tv, s in users):
                cov.sample(**{"write timing": "right after last use"})
            if any(s != w_bank and t - tv < latency for tv, s in users):
                cov.sample(**{"write timing": "beside the other bank streaming"})
        # Input vector (not on a bank whose row 0 is written this cycle: the vector reaches row 0
        # now, column c at t + c, and would see the old row in column 0 only). Later writes to
        # its bank wait for it (write_ok).
        x = np.zeros(rows, dtype=np.int64)
        sel = int(rng.integers(0, 2)) if rng.random() < 0.5 or last_sel < 0 else last_sel
        valid = rng.random() < p_x and not (w_en and w_bank == sel and w_row == 0)
        if valid:
            kind, x = _pattern(rng, rows)
            vectors.append((t, x, sel))
            entered[t + latency] = (t, x, sel)
            cov.sample(x=kind, sel=sel,
                       switch="same bank" if sel == last_sel else "other bank",
                       gap=t - last_vec_t - 1)
            last_vec_t, last_sel = t, sel
        dut.x.value = pack(x, 8)
        dut.sel.value = sel
        dut.w_en.value = w_en
        dut.w_bank.value = w_bank
        dut.w_row.value = w_row
        dut.w_data.value = pack(w_vals, 8)
        await ReadOnly()
        got = unpack(read_int(dut.y), cols, 32)
        want = np.zeros(cols, dtype=np.int64)
        if t in entered:
            # Computed now: weight writes after the vector entered (before it reached a row)
            # count, and every row it met is in the history by now.
            tv, xv, sv = entered.pop(t)
            w = np.stack([weights_at(sv, k, tv + k) for k in range(rows)])
            want = numerics.matmul(xv[None, :], w)[0]
        cov.sample(**{"|y| max": int(np.abs(want).max())})
        if not np.array_equal(got, want):
            mismatches += 1
            dut._log.error("cycle %d: y = %s, expected %s", t, got.tolist(), want.tolist())
            if mismatches >= 5:
                break
        await RisingEdge(dut.clk)
    finish_coverage(cov, dut._log)
    if mismatches:
        raise fail(f"{mismatches} cycle(s) with a wrong array output")
