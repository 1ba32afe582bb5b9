"""The cocotb test that runs a batch of programs on the RTL simulation top (``NPUSimTop``).

This module is loaded by the HDL simulator (Verilator or Icarus, launched by
:func:`npu.verify.run_rtl`), never imported by the rest of the package. It reads a batch of jobs
from the ``.npz`` file named by ``NPU_VERIFY_JOBS`` and, for each job:

1. writes the instruction memory, the DRAM image (only the bytes that differ from what DRAM
   holds now), zeroes every SPAD/ACC row that is not zero, and marks the trace memories "never";
2. pulses ``start`` and sleeps until the status register changes (``done`` or ``fault``), or a
   cycle budget runs out: the simulator runs the whole program with no Python in the loop;
3. reads the status, the trace memories, then resets the design, lets its pipelines drain
   (so that a fault's in-flight writes land now, not in the next job) and reads DRAM, SPAD and
   ACC back.

Results go to the ``.npz`` named by ``NPU_VERIFY_OUT``. Handle names and status field offsets
come from the job file (:mod:`npu.verify` derives them from ``npu.hw``), so nothing here knows
the RTL beyond the names of the memories of the simulation top.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import First, RisingEdge, Timer

try:
    from cocotb.simtime import get_sim_time
except ImportError:  # cocotb < 2.1
    from cocotb.utils import get_sim_time

PERIOD_NS = 10


def _field(value: int, spec: list[int]) -> int:
    offset, width = spec
    return (value >> offset) & ((1 << width) - 1)


class _Memory:
    """One memory array of the design, accessed element by element through the GPI."""

    def __init__(self, handle: Any, depth: int, width_bytes: int) -> None:
        self.handle, self.depth, self.width_bytes = handle, depth, width_bytes
        self._elems: dict[int, Any] = {}

    def elem(self, i: int) -> Any:
        e = self._elems.get(i)
        if e is None:
            e = self._elems[i] = self.handle[i]
        return e

    def write(self, i: int, value: int) -> None:
        self.elem(i).value = value

    def read(self, i: int) -> int:
        e = self.elem(i)
        try:  # the raw bit string: much faster than building a LogicArray
            return int(e._handle.get_signal_val_binstr(), 2)
        except (AttributeError, ValueError):  # another cocotb, or X/Z bits (-> a clear error)
            return int(e.value)

    def read_rows(self, n: int) -> np.ndarray:
        """Rows [0, n) as bytes (little endian), shape (n, width_bytes)."""
        w = self.width_bytes
        raw = b"".join(self.read(i).to_bytes(w, "little") for i in range(n))
        return np.frombuffer(raw, dtype=np.uint8).reshape(n, w).copy()


def _lookup(dut: Any, path: str) -> Any:
    h = dut
    for part in path.split("."):
        try:
            h = getattr(h, part)
        except AttributeError:
            raise RuntimeError(f"the simulation top has no {path!r} (missing {part!r}): "
                               f"has npu.hw.simtop changed?") from None
    return h


@cocotb.test()
async def run_jobs(dut: Any) -> None:
    """Run every job of the batch and write the results."""
    spec = np.load(os.environ["NPU_VERIFY_JOBS"], allow_pickle=False)
    meta = json.loads(str(spec["meta"]))
    names = meta["handles"]
    beat = meta["beat"]
    never = meta["never"]
    status_fields = meta["status"]
    flush = meta["flush_cycles"]
    imem = _Memory(_lookup(dut, names["imem"]), meta["imem_depth"], 32)
    spad = _Memory(_lookup(dut, names["spad"]), meta["spad_rows"], meta["cols"])
    acc = _Memory(_lookup(dut, names["acc"]), meta["acc_rows"], 4 * meta["cols"])
    lanes = [_Memory(_lookup(dut, name), meta["dram_size"] // beat, 1)
             for name in names["lanes"]]
    traces = {ev: _Memory(_lookup(dut, name), meta["trace_depth"], 6)
              for ev, name in names["traces"].items()}
    status = _lookup(dut, names["status"])
    # What the memories hold now (the design's initial contents are zero).
    dram_now = np.zeros(meta["dram_size"], dtype=np.uint8)
    dram_extent = 0                    # bytes [0, extent) may differ from zero
    spad_nz = np.zeros(0, dtype=np.int64)   # rows known to be non-zero
    acc_nz = np.zeros(0, dtype=np.int64)

    cocotb.start_soon(Clock(dut.clk, PERIOD_NS, unit="ns").start())
    dut.start.value = 0
    dut.rst.value = 1
    await RisingEdge(dut.clk)
    await RisingEdge(dut.clk)
    dut.rst.value = 0
    await RisingEdge(dut.clk)

    out: dict[str, np.ndarray] = {}
    jobs = meta["jobs"]
    for k, job in enumerate(jobs):
        info: dict[str, Any] = {"error": "", "hang": False}
        t_wall = time.perf_counter()
        try:
            words = spec[f"words{k}"]
            image = spec[f"dram{k}"]
            n = int(job["n_instr"])
            # 1. Load.
            for i, row in enumerate(words):
                imem.write(i, int.from_bytes(row.astype("<u8").tobytes(), "little"))
            for mem in traces.values():
                for i in range(min(n, mem.depth)):
                    mem.write(i, never)
            target_extent = max(dram_extent, len(image))
            target = np.zeros(target_extent, dtype=np.uint8)
            target[:len(image)] = image
            for a in np.flatnonzero(target != dram_now[:target_extent]).tolist():
                lanes[a % beat].write(a // beat, int(target[a]))
            dram_now[:target_extent] = target
            dram_extent = len(image)
            for r in spad_nz.tolist():
                spad.write(r, 0)
            for r in acc_nz.tolist():
                acc.write(r, 0)
            dut.n_instr.value = n
            dut.dram_bytes.value = int(job["dram_bytes"])
            dut.watchdog.value = int(job["watchdog"])
            await RisingEdge(dut.clk)
            load_s = time.perf_counter() - t_wall
            # 2. Run: start, then sleep until the status register changes.
            t_run = time.perf_counter()
            dut.start.value = 1
            await RisingEdge(dut.clk)
            dut.start.value = 0
            t0 = int(get_sim_time("ns"))
            deadline = t0 + int(job["budget"]) * PERIOD_NS
            st = 0
            while True:
                st = int(status.value)
                if _field(st, status_fields["done"]) or _field(st, status_fields["fault"]):
                    break
                now = int(get_sim_time("ns"))
                if now >= deadline:
                    info["hang"] = True
                    break
                await First(status.value_change, Timer(deadline - now, unit="ns"))
            run_s = time.perf_counter() - t_run
            sim_cycles = (int(get_sim_time("ns")) - t0) // PERIOD_NS
            # 3. Read back: status and trace now; memories after a reset and a pipeline drain.
            for key, fs in status_fields.items():
                info[key] = _field(st, fs)
            m = min(n, meta["trace_depth"])
            tr = np.full((len(traces), n), -1, dtype=np.int64)
            for j, mem in enumerate(traces.values()):
                vals = np.array([mem.read(i) for i in range(m)], dtype=np.int64)
                tr[j, :m] = np.where(vals == never, -1, vals)
            out[f"trace{k}"] = tr
            dut.rst.value = 1
            await RisingEdge(dut.clk)
            await RisingEdge(dut.clk)
            dut.rst.value = 0
            await Timer(flush * PERIOD_NS, unit="ns")
            await RisingEdge(dut.clk)
            nb = int(job["dram_bytes"])
            rows = -(-nb // beat)
            by_lane = [lane.read_rows(min(rows, lane.depth))[:, 0] for lane in lanes]
            dram = np.zeros(rows * beat, dtype=np.uint8)
            for j, vals in enumerate(by_lane):
                dram[j::beat][:len(vals)] = vals
            out[f"dram{k}"] = dram[:nb]
            dram_now[:nb] = dram[:nb]
            sp = spad.read_rows(spad.depth)
            ac = acc.read_rows(acc.depth)
            out[f"spad{k}"] = sp
            out[f"acc{k}"] = ac
            spad_nz = np.flatnonzero(sp.any(axis=1))
            acc_nz = np.flatnonzero(ac.any(axis=1))
            info.update(load_s=load_s, run_s=run_s, sim_cycles=int(sim_cycles),
                        total_s=time.perf_counter() - t_wall)
        except Exception:  # noqa: BLE001 - reported per job; the batch goes on
            info["error"] = traceback.format_exc()
            dut.rst.value = 1
            await RisingEdge(dut.clk)
            await RisingEdge(dut.clk)
            dut.rst.value = 0
            await Timer(flush * PERIOD_NS, unit="ns")
            # Unknown memory state: rewrite everything the program could have written (its
            # DRAM range, all of SPAD and ACC) before the next job.
            nb = int(job["dram_bytes"])
            dram_now[:nb] = ~dram_now[:nb]
            dram_extent = max(dram_extent, nb)
            spad_nz = np.arange(spad.depth)
            acc_nz = np.arange(acc.depth)
        out[f"info{k}"] = np.array(json.dumps(info))
    np.savez(os.environ["NPU_VERIFY_OUT"], **out)
