"""cocotb testbench of the vector unit (``npu.hw.vector.VectorUnit``) with its SPAD and ACC.

Driver: rounds of 1..6 constrained-random VECTOR / ELTWISE instructions on freshly randomised
memories, each started as the timing contract allows: at the earliest (``s = s_prev + busy``)
or after a random gap, and an ELTWISE no earlier than the latest completion of the VX
instructions before it (the hazard rule) — often exactly then.

Monitor: the unit's SPAD write port, every cycle. Scoreboard: each instruction must write its
``n`` destination rows, each between its start and ``c - 1`` (``c = s + busy + vx_depth``,
:func:`npu.isa.timing`); at ``c`` the rows it wrote last hold the value the reference semantics
give (``npu.numerics`` applied in start order, the contract's atomic model), and at the end of
the round all of SPAD does.

Coverage: opcode and function, row counts, 2-D and zero strides, in-place destinations,
shift ranges, parameter extremes (bias wrap, multiplier limits, shift bits above 6; ELTWISE
ADD's multipliers 0, maximal and 23-bit wide, its largest shift, unsaturated sums), the fp32
mode (float32 scales: negative, exponent field 0 or 255, products that saturate, exact ties,
|x| >= 2**24), saturation, inverted clamps, start spacing and the hazard boundary.
"""

from __future__ import annotations

from typing import Any

import cocotb
import numpy as np
from cocotb.triggers import ReadOnly, RisingEdge
from tbutil import (
    bench_config,
    fail,
    finish_coverage,
    make_rng,
    pack,
    params,
    read_int,
    start,
    unpack,
)

from npu import numerics
from npu.coverage import Coverage
from npu.isa import (
    LAYOUTS,
    VECTOR_PARAM_ROWS,
    EltFunc,
    Instr,
    NPUConfig,
    Opcode,
    address_error,
    timing,
)

#: ELTWISE's fields: multipliers and shift are drawn over their ranges.
_ELT = LAYOUTS[Opcode.ELTWISE]


def coverage() -> Coverage:
    cov = Coverage("vector unit")
    cov.point("op", ["VECTOR", "VECTOR fp32", "ELTWISE ADD", "ELTWISE MAX"])
    cov.point("n", {"1": lambda n: n == 1, "2-7": lambda n: 2 <= n < 8, ">=8": lambda n: n >= 8})
    cov.cross("op x n", ("op", "n"))
    cov.point("eltwise shape", ["2-D", "zero inner stride", "in place on A", "in place on B",
                                "strided"])
    cov.point("shift", {"0": lambda s: s == 0, "1-25": lambda s: 1 <= s <= 25,
                        "26-62": lambda s: 26 <= s <= 62, "63": lambda s: s == 63,
                        "bits above 6 set": lambda s: s >= 64 or s < 0})
    cov.cross("op x shift", ("op", "shift"),
              waive={**{f"ELTWISE {f} x {b}": "ELTWISE's shift field is 5 bits (0..31)"
                        for f in ("ADD", "MAX") for b in ("63", "bits above 6 set")},
                     **{f"VECTOR fp32 x {b}": "fp32 mode ignores the shift row"
                        for b in ("0", "1-25", "26-62", "63", "bits above 6 set")}})
    cov.point("params", ["bias wraps int32", "mult = INT32_MIN", "mult = INT32_MAX",
                         "negative mult"])
    cov.point("fp32 scale", ["negative", "exponent field 0", "exponent field 255",
                             "product in int8 range", "product beyond 2**15", "product tie",
                             "|x| >= 2**24 rounded"])
    cov.point("eltwise add", ["shift max", "mult 0", "mult max", "mult top bit set",
                              "result not saturated"])
    cov.point("result", ["saturates high", "saturates low", "clamp lo > hi"])
    cov.point("start", ["back-to-back", "gap", "at the hazard boundary"])
    return cov


class Model:
    """The reference semantics (``npu.numerics``) on numpy copies of SPAD and ACC."""

    def __init__(self, cfg: NPUConfig, rng: np.random.Generator) -> None:
        self.cfg = cfg
        self.param_rows: list[int] = [0]
        self.f32_rows: list[int] = [0]
        self.spad = rng.integers(-128, 128, (cfg.spad_rows, cfg.cols)).astype(np.int8)
        self.acc = rng.integers(-(1 << 31), 1 << 31, (cfg.acc_rows, cfg.cols)).astype(np.int32)

    def apply(self, ins: Instr) -> list[int]:
        """Apply one instruction; returns the SPAD rows it wrote, in order."""
        f = ins.fields
        if ins.opcode == Opcode.VECTOR:
            p = f["param_addr"]
            bias, mult, shift = (self.acc[p + k].astype(np.int64) for k in range(3))
            rows = list(range(f["spad_addr"], f["spad_addr"] + f["n"]))
            with np.errstate(over="ignore"):       # fp32: float32 overflow saturates
                self.spad[rows] = numerics.requantize(
                    self.acc[f["acc_addr"]:f["acc_addr"] + f["n"]], bias, mult, shift,
                    f["zero_point"], f["clamp_min"], f["clamp_max"], f["fp32"])
            return rows
        idx = [(o, i) for o in range(f["n_outer"]) for i in range(f["n_inner"])]
        a = self.spad[[f["a_addr"] + o * f["a_stride_outer"] + i * f["a_stride_inner"]
                       for o, i in idx]]
        b = self.spad[[f["b_addr"] + o * f["b_stride_outer"] + i * f["b_stride_inner"]
                       for o, i in idx]]
        if f["func"] == EltFunc.ADD:
            out = numerics.eltwise_add(a, b, f["a_zero"], f["b_zero"], f["a_mult"], f["b_mult"],
                                       f["shift"], f["zero_point"], f["clamp_min"],
                                       f["clamp_max"])
        else:
            out = numerics.eltwise_max(a, b, f["clamp_min"], f["clamp_max"])
        rows = list(range(f["dst"], f["dst"] + len(idx)))
        self.spad[rows] = out
        return rows


def _int8(rng: np.random.Generator) -> int:
    return int(rng.choice([-128, 127, 0, int(rng.integers(-128, 128))]))


def _mult(rng: np.random.Generator) -> int:
    """An ELTWISE multiplier: 0, the maximum, uniform, or of a random bit length."""
    top = _ELT["a_mult"].hi
    return int(rng.choice([0, top, int(rng.integers(0, top + 1)),
                           int(rng.integers(0, 1 << int(rng.integers(1, top.bit_length() + 1))))]))


def random_instr(rng: np.random.Generator, cfg: NPUConfig, model: Model) -> Instr:
    """A legal VECTOR or ELTWISE for ``cfg`` (addresses anywhere, often at the memory ends)."""
    for _ in range(1000):
        n = int(rng.choice([1, int(rng.integers(2, 8)), int(rng.integers(8, 24))]))
        lo, hi = sorted((_int8(rng), _int8(rng)))
        if rng.random() < 0.1:
            lo, hi = hi, lo                                         # inverted clamp
        if rng.random() < 0.5:
            op = Opcode.VECTOR
            fp32 = int(rng.random() < 0.5)
            rows = model.f32_rows if fp32 else model.param_rows
            f = dict(acc_addr=int(rng.integers(0, cfg.acc_rows - n + 1)),
                     spad_addr=int(rng.integers(0, cfg.spad_rows - n + 1)),
                     param_addr=int(rng.choice(rows)) if rng.random() < 0.7
                     else int(rng.integers(0, cfg.acc_rows - VECTOR_PARAM_ROWS + 1)),
                     n=n, zero_point=_int8(rng), clamp_min=lo, clamp_max=hi, fp32=fp32)
        else:
            op = Opcode.ELTWISE
            n_outer = int(rng.choice([1, 1, int(rng.integers(2, 4))]))
            n_inner = max(1, n // n_outer)
            total = n_inner * n_outer
            shape = str(rng.choice(["plain", "zero", "inplace_a", "inplace_b", "strided"]))
            si = {"zero": 0, "strided": int(rng.integers(2, 4))}.get(shape, 1)
            so = int(rng.integers(0, 2 * n_inner + 1))
            dst = int(rng.integers(0, cfg.spad_rows - total + 1))
            f = dict(func=int(rng.integers(0, 2)), a_addr=int(rng.integers(0, cfg.spad_rows)),
                     b_addr=int(rng.integers(0, cfg.spad_rows)),
                     shift=int(rng.choice([0, int(rng.integers(1, 26)),
                                           int(rng.integers(26, _ELT["shift"].hi + 1)),
                                           _ELT["shift"].hi])),
                     dst=dst, a_stride_outer=so, b_stride_outer=int(rng.integers(0, 8)),
                     n_inner=n_inner, a_stride_inner=si, b_stride_inner=int(rng.integers(0, 3)),
                     a_mult=_mult(rng), b_mult=_mult(rng),
                     n_outer=n_outer, a_zero=_int8(rng), b_zero=_int8(rng),
                     zero_point=_int8(rng), clamp_min=lo, clamp_max=hi)
            if shape in ("inplace_a", "inplace_b"):
                src = shape[-1]
                f[f"{src}_addr"] = dst
                f[f"{src}_stride_inner"] = 1
                f[f"{src}_stride_outer"] = n_inner
            if rng.random() < 0.3:   # compiler-like ADD (scale ratios 1/8..1/2): spread results
                shift = int(rng.integers(12, 25))
                f.update(func=int(EltFunc.ADD), shift=shift, clamp_min=-128, clamp_max=127,
                         a_mult=int(rng.integers(1 << (shift - 3), 1 << (shift - 1))),
                         b_mult=int(rng.integers(1 << (shift - 3), 1 << (shift - 1))))
        ins = Instr(op, 0, 0, f)
        if address_error(ins, cfg, 1 << 20) is None:
            return ins
    raise AssertionError("could not draw a legal VX instruction")


def _sample_instr(cov: Coverage, ins: Instr, model: Model) -> None:
    f = ins.fields
    if ins.opcode == Opcode.VECTOR:
        op = "VECTOR fp32" if f["fp32"] else "VECTOR"
        cov.sample(op=op, n=f["n"])
        p = f["param_addr"]
        bias, mult, shift = (model.acc[p + k].astype(np.int64) for k in range(3))
        x = model.acc[f["acc_addr"]:f["acc_addr"] + f["n"]].astype(np.int64) + bias
        if ((x > (1 << 31) - 1) | (x < -(1 << 31))).any():
            cov.sample(params="bias wraps int32")
        if f["fp32"]:
            _sample_f32(cov, numerics.wrap_int32(x), mult)
            if f["clamp_min"] > f["clamp_max"]:
                cov.sample(result="clamp lo > hi")
            return
        for s in shift.tolist():
            cov.sample(op="VECTOR", shift=s)
        if (mult == -(1 << 31)).any():
            cov.sample(params="mult = INT32_MIN")
        if (mult == (1 << 31) - 1).any():
            cov.sample(params="mult = INT32_MAX")
        if (mult < 0).any():
            cov.sample(params="negative mult")
    else:
        op = "ELTWISE ADD" if f["func"] == EltFunc.ADD else "ELTWISE MAX"
        cov.sample(op=op, n=f["n_inner"] * f["n_outer"], shift=f["shift"])
        if f["func"] == EltFunc.ADD:
            mults, top = (f["a_mult"], f["b_mult"]), _ELT["a_mult"].hi
            for label, hit in (("shift max", f["shift"] == _ELT["shift"].hi),
                               ("mult 0", 0 in mults), ("mult max", top in mults),
                               ("mult top bit set", max(mults) > top >> 1)):
                if hit:
                    cov.sample(**{"eltwise add": label})
        if f["n_outer"] > 1:
            cov.sample(**{"eltwise shape": "2-D"})
        if f["a_stride_inner"] == 0 or f["b_stride_inner"] == 0:
            cov.sample(**{"eltwise shape": "zero inner stride"})
        if f["a_stride_inner"] > 1 or f["b_stride_inner"] > 1:
            cov.sample(**{"eltwise shape": "strided"})
        for src in ("a", "b"):
            if f[f"{src}_addr"] == f["dst"]:
                cov.sample(**{"eltwise shape": f"in place on {src.upper()}"})
    if f["clamp_min"] > f["clamp_max"]:
        cov.sample(result="clamp lo > hi")


def _sample_f32(cov: Coverage, x: np.ndarray, bits: np.ndarray) -> None:
    """fp32 bins of one VECTOR: its scales, and its products (float32, as numpy computes)."""
    exp = (bits >> 23) & 0xFF
    for label, hit in (("negative", (bits < 0) & (exp != 0) & (exp != 0xFF)),
                       ("exponent field 0", exp == 0), ("exponent field 255", exp == 0xFF)):
        if hit.any():
            cov.sample(**{"fp32 scale": label})
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.abs(x.astype(np.float32) * numerics.f32_scales(bits))
    if ((p > 0) & (p < 128)).any():
        cov.sample(**{"fp32 scale": "product in int8 range"})
    if (p > numerics.F32_PRODUCT_LIMIT).any():
        cov.sample(**{"fp32 scale": "product beyond 2**15"})
    if ((p < 256) & (p - np.floor(p) == 0.5)).any():
        cov.sample(**{"fp32 scale": "product tie"})
    big = np.abs(x) >= 1 << 24
    if (big & (x.astype(np.float32).astype(np.int64) != x)).any() and (p[big] < 256).any():
        cov.sample(**{"fp32 scale": "|x| >= 2**24 rounded"})


#: Exponents k of the power-of-two scales 2**-k (and of the accumulators that tie with them).
TIE_EXP = (23, 27)


def _f32_scales(rng: np.random.Generator, cols: int) -> np.ndarray:
    """A multiplier row of float32 bit patterns: mostly scales that bring a full-range int32
    near the int8 range (some of them powers of two, so products tie), some negative, some
    anywhere, some with exponent field 0 or 255."""
    kind = rng.integers(0, 6, cols)
    mag = np.where(kind == 1, 2.0 ** -rng.integers(TIE_EXP[0], TIE_EXP[1], cols),
                   rng.uniform(0.5, 2.0, cols) * 2.0 ** -rng.integers(18, 28, cols))
    bits = numerics.f32_bits(np.where(rng.random(cols) < 0.3, -mag, mag))
    bits = np.where(kind == 3, rng.integers(-(1 << 31), 1 << 31, cols), bits)
    special = (rng.integers(0, 2, cols) * 0xFF) << 23 | rng.integers(0, 1 << 23, cols)
    bits = np.where(kind == 4, special, bits)
    return numerics.wrap_int32(bits)


def _params(rng: np.random.Generator, model: Model, cfg: NPUConfig) -> None:
    """Make some ACC rows parameter triples with extremes (the rest stay random); VECTOR
    instructions mostly use these (``model.param_rows``)."""
    model.param_rows = []
    for _ in range(4):
        p = int(rng.integers(0, cfg.acc_rows - VECTOR_PARAM_ROWS + 1))
        model.param_rows.append(p)
        model.acc[p] = rng.choice([-(1 << 31), (1 << 31) - 1, 0, 12345], cfg.cols)
        model.acc[p + 1] = rng.choice([-(1 << 31), (1 << 31) - 1, 1 << 30,
                                       int(rng.integers(1 << 20, 1 << 31))], cfg.cols)
        model.acc[p + 2] = rng.choice([0, 20, 31, 40, 63, 64 + 35, -1], cfg.cols)
    # fp32 triples: small biases (the products stay near the int8 range), float32 scales, and a
    # random shift row (ignored).
    model.f32_rows = []
    for _ in range(3):
        p = int(rng.integers(0, cfg.acc_rows - VECTOR_PARAM_ROWS + 1))
        model.f32_rows.append(p)
        model.acc[p] = rng.choice([0, 0, -(1 << 31), int(rng.integers(-1000, 1000))], cfg.cols)
        model.acc[p + 1] = _f32_scales(rng, cfg.cols)
        model.acc[p + 2] = rng.integers(-(1 << 31), 1 << 31, cfg.cols)
    # Accumulator rows that make ties with the power-of-two scales: x = r * 2**k + 2**(k-1).
    for r in rng.integers(0, cfg.acc_rows, 12).tolist():
        k = rng.integers(TIE_EXP[0], TIE_EXP[1], cfg.cols)
        model.acc[r] = numerics.wrap_int32(rng.integers(-128, 128, cfg.cols) << k | 1 << (k - 1))


@cocotb.test()
async def vector_random(dut: Any) -> None:
    """Constrained-random VECTOR/ELTWISE rounds against the reference semantics."""
    p = params()
    cfg = bench_config(p)
    total = p.get("amount", 150)
    rng = make_rng(dut._log)
    cov = coverage()
    dut.start_valid.value = 0
    dut.start_word.value = 0
    dut.start_index.value = 0
    dut.start_cycle.value = 0
    dut.start_bank.value = 0
    await start(dut)
    errors: list[str] = []
    t = 0
    issued = 0
    # Past `total`, rounds go on (up to 4x) while the coverage has holes.
    while (issued < total or cov.missed()) and issued < 4 * total and len(errors) < 5:
        # A round: fresh memories, then a burst of instructions.
        model = Model(cfg, rng)
        _params(rng, model, cfg)
        for r in range(cfg.spad_rows):
            dut.spad[r].value = pack(model.spad[r], 8)
        for r in range(cfg.acc_rows):
            dut.acc[r].value = pack(model.acc[r], 32)
        await RisingEdge(dut.clk)
        t += 1
        plan: dict[int, tuple[int, Instr, list[int], int]] = {}   # start cycle -> instr
        checks: dict[int, list[tuple[int, list[int], np.ndarray]]] = {}
        next_free, latest_c = t + 1, 0
        pending = []
        for k in range(int(rng.integers(1, 7))):
            ins = random_instr(rng, cfg, model)
            tm = timing(ins, cfg)
            s = next_free if rng.random() < 0.6 else next_free + int(rng.integers(1, 6))
            how = "back-to-back" if s == next_free else "gap"
            if ins.opcode == Opcode.ELTWISE and s < latest_c:
                s = latest_c
                how = "at the hazard boundary"
            cov.sample(start=how)
            _sample_instr(cov, ins, model)
            rows = model.apply(ins)
            out = model.spad[rows].copy()
            if (out == 127).any():
                cov.sample(result="saturates high")
            if (out == -128).any():
                cov.sample(result="saturates low")
            if ins.opcode == Opcode.ELTWISE and ins.func == EltFunc.ADD and \
                    np.unique(out).size > 4:     # not everything clamped or rounded to 0
                cov.sample(**{"eltwise add": "result not saturated"})
            c = s + tm.latency
            plan[s] = (k, ins, rows, c)
            pending.append((k, rows, c))
            next_free, latest_c = s + tm.busy, max(latest_c, c)
        # Rows an instruction writes last in the round are checked at its completion.
        for k, rows, c in pending:
            later = {r for k2, rows2, _c in pending if k2 > k for r in rows2}
            mine = [r for r in rows if r not in later]
            checks.setdefault(c, []).append((k, mine, model.spad[mine].copy()))
        writes: dict[int, list[int]] = {}
        active: list[tuple[int, int, int]] = []     # (k, start, c)
        end = latest_c + 2
        while t <= end:
            go = plan.get(t)
            if go is not None:
                k, ins, rows, c = go
                dut.start_valid.value = 1
                dut.start_word.value = int.from_bytes(ins.encode(), "little")
                dut.start_index.value = k
                dut.start_cycle.value = t
                active.append((k, t, c))
                issued += 1
            else:
                dut.start_valid.value = 0
            await ReadOnly()
            if read_int(dut.spad_w_en):
                writes.setdefault(t, []).append(read_int(dut.spad_w_addr))
            for k, rows, want in checks.get(t, []):
                got = np.array([unpack(read_int(dut.spad[r]), cfg.cols, 8) for r in rows],
                               dtype=np.int64).reshape(len(rows), cfg.cols)
                if not np.array_equal(got, want.astype(np.int64)):
                    errors.append(f"cycle {t}: instruction {k} ({plan_text(plan, k)}) rows "
                                  f"{rows}: SPAD {got.tolist()}, expected {want.tolist()}")
            await RisingEdge(dut.clk)
            t += 1
        # Every instruction wrote its rows, in order, within [s, c - 1].
        for (k, s, c), (_s, (_k, ins, rows, _c)) in zip(active, sorted(plan.items())):
            seen = [(w, a) for w, addrs in sorted(writes.items()) for a in addrs if s <= w < c]
            got_rows = [a for w, a in seen if a in rows]
            if sorted(set(got_rows)) != sorted(set(rows)):
                errors.append(f"instruction {k} ({ins.opcode.name}, start {s}, c {c}) wrote "
                              f"rows {got_rows} within [s, c-1], expected {rows}")
        final = np.array([unpack(read_int(dut.spad[r]), cfg.cols, 8)
                          for r in range(cfg.spad_rows)], dtype=np.int64)
        bad = np.flatnonzero((final != model.spad.astype(np.int64)).any(axis=1))
        if bad.size:
            r = int(bad[0])
            errors.append(f"end of round: SPAD row {r} = {final[r].tolist()}, expected "
                          f"{model.spad[r].tolist()} ({bad.size} rows differ)")
    for e in errors:
        dut._log.error(e)
    finish_coverage(cov, dut._log)
    if errors:
        raise fail(f"{len(errors)} vector unit error(s); first: {errors[0]}")


def plan_text(plan: dict[int, tuple[int, Instr, list[int], int]], k: int) -> str:
    from npu.asm import format_instruction
    for _s, (k2, ins, _rows, _c) in plan.items():
        if k2 == k:
            return format_instruction(ins)
    return "?"
