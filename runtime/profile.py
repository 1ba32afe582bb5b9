"""Where the cycles went: a profile computed from a run's trace and decoded fields alone.

:meth:`Profile.from_result` never re-simulates. It reads the per-instruction cycles a
:class:`~npu.runtime.result.RunResult` recorded (dispatch, ready, start, complete, retire, stall
reason) and the instruction fields, and derives everything else with vectorised numpy, so a
program of 100k+ instructions is profiled in well under a second:

* per instruction: engine, unit, opcode, region, start, end (= retire), stall cycles
  (``start - ready``) and the stall reason, busy cycles, MACs and DRAM bytes;
* per engine: busy cycles (union of its units' busy intervals ``[start, start + busy)``),
  stalled cycles (its head instruction waits while no unit of the engine is busy), idle cycles
  (nothing to do: the rest), and the stalled cycles split by reason; the dispatcher gets a row
  of its own (busy = cycles it dispatched, stalled = cycles a full queue or a BARRIER held it);
* totals and per region (the program's labels, e.g. layer names): the cycles it spans, the
  cycles it adds to the total (regions of a pipelined program overlap, so spans double count),
  MACs, ideal cycles (MACs / PEs), array utilization, DRAM bytes read and written, arithmetic
  intensity and whether a roofline against the config's peaks calls it compute- or
  memory-bound.

Outputs: :meth:`Profile.table` (terminal text), :meth:`Profile.to_dict` / :meth:`to_json`
(:meth:`from_dict` / :meth:`from_json` read them back), :meth:`Profile.to_perfetto` (Chrome
trace JSON for https://ui.perfetto.dev, 1 us = 1 cycle) and :meth:`Profile.plot` (PNG).
``docs/profiling.md`` explains how to read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any

import numpy as np

from npu.isa import (
    LAYOUTS,
    OPCODE_ENGINE,
    OPCODE_UNIT,
    Engine,
    NPUConfig,
    Opcode,
    Unit,
    field_arrays,
    timing_arrays,
)
from npu.runtime.result import RunResult, Stall

__all__ = ["PROFILE_VERSION", "DISPATCHER", "UNLABELLED", "EngineStats", "RegionStats",
           "Profile"]

#: Version of the JSON written by :meth:`Profile.to_dict`.
PROFILE_VERSION = 1
#: Engine name used for BARRIER/HALT (handled by the dispatcher, not by an engine).
DISPATCHER = "DISP"
#: Region label of instructions before the program's first label.
UNLABELLED = "(unlabelled)"

# Lookup tables indexed by opcode (4 bits), built from the ISA module so nothing is retyped.
_ENGINE_OF = np.full(16, -1, dtype=np.int64)
_OPNAME = ["?"] * 16
for _op in Opcode:
    _OPNAME[_op] = _op.name
    if OPCODE_ENGINE[_op] is not None:
        _ENGINE_OF[_op] = int(OPCODE_ENGINE[_op])
_UNITS_OF_ENGINE = {e: sorted({u for op, u in OPCODE_UNIT.items() if OPCODE_ENGINE[op] == e})
                    for e in Engine}
#: Perfetto thread names of the units (EX has two: its weight loader and its array).
_UNIT_TRACK = {Unit.LD_DMA: "LD", Unit.EX_WEIGHTS: "EX weights (PRELOAD)",
               Unit.EX_ARRAY: "EX array (MATMUL)", Unit.VX: "VX", Unit.ST_DMA: "ST"}
_MAIN_UNIT = {Engine.LD: Unit.LD_DMA, Engine.EX: Unit.EX_ARRAY, Engine.VX: Unit.VX,
              Engine.ST: Unit.ST_DMA}
_ENGINE_NAMES = [e.name for e in Engine]
_STALL_NAMES = [s.name for s in Stall]
# Instruction columns kept by the profile; the names of the enums are stored in JSON.
_ENUM_COLUMNS = {"unit": [u.name for u in Unit], "stall_reason": _STALL_NAMES}
_INT_COLUMNS = ("region", "dispatch", "ready", "start", "complete", "end", "busy",
                "stall_cycles", "macs", "dram_read", "dram_write")


@dataclass(frozen=True)
class EngineStats:
    """Cycle accounting of one engine (or the dispatcher): busy + stalled + idle = cycles."""

    name: str
    instructions: int
    busy: int
    stalled: int
    idle: int
    stalled_by_reason: dict[str, int]

    @property
    def busy_fraction(self) -> float:
        total = self.busy + self.stalled + self.idle
        return self.busy / total if total else 0.0


@dataclass(frozen=True)
class RegionStats:
    """Figures of one region (a labelled run of instructions, e.g. a layer) or of the total.

    ``first``/``last``: its instruction indices. ``start``/``end``: the first start and last
    retirement of its engine instructions (-1 if it has none); ``span = end - start``. Regions
    of a pipelined program overlap in time (the next layer's loads run beside this one's
    matmuls), so spans double count. ``cycles`` is the region's share of the total instead:
    from the latest end of the regions before it to its own end (the last region runs to the
    program's end), so the regions' cycles sum to the total, and a region that finishes in the
    shadow of earlier ones costs little. ``utilization = macs / (cycles x PEs)``.
    ``intensity`` is MACs per DRAM byte (read + written; None without DRAM traffic).
    ``memory_cycles`` is the DRAM lower bound: the busier channel's bytes / bytes per beat.
    ``bound`` is "compute" when ``ideal_cycles >= memory_cycles``, else "memory" ("-" when the
    region does neither)."""

    label: str
    first: int
    last: int
    instructions: int
    start: int
    end: int
    span: int
    cycles: int
    macs: int
    ideal_cycles: float
    utilization: float
    dram_read: int
    dram_write: int
    intensity: float | None
    memory_cycles: float
    bound: str

    @property
    def dram_bytes(self) -> int:
        return self.dram_read + self.dram_write

    @property
    def macs_per_cycle(self) -> float:
        """Achieved MACs per cycle of the region's share of the total."""
        return self.macs / self.cycles if self.cycles > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Interval arithmetic (vectorised)
# --------------------------------------------------------------------------------------------

def _union(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge half-open intervals into sorted disjoint ones."""
    if len(start) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(start, kind="stable")
    s, e = start[order], end[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    return s[first], np.maximum.reduceat(e, first)


def _covered(ms: np.ndarray, me: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Length of the union of disjoint sorted intervals (ms, me) that lies below each x."""
    if len(ms) == 0:
        return np.zeros(len(x), np.int64)
    before = np.concatenate(([0], np.cumsum(me - ms)[:-1]))
    k = np.searchsorted(ms, x, side="right") - 1
    kk = np.maximum(k, 0)
    inside = np.clip(x - ms[kk], 0, me[kk] - ms[kk])
    return np.where(k < 0, 0, before[kk] + inside)


def _bound(macs: int, ideal: float, memory: float) -> str:
    if macs == 0 and memory == 0:
        return "-"
    return "memory" if memory > ideal else "compute"


def _mask_names(mask: int) -> str:
    return "|".join(e.name for e in Engine if mask >> e & 1)


# --------------------------------------------------------------------------------------------
# The profile
# --------------------------------------------------------------------------------------------

@dataclass
class Profile:
    """The profile of one run. Build it with :meth:`from_result` (or read it back with
    :meth:`from_dict`); ``instructions`` holds one numpy column per quantity (see
    :meth:`from_result`), indexed by instruction."""

    config: NPUConfig
    name: str
    cycles: int
    region_labels: list[str]
    instructions: dict[str, np.ndarray]
    engines: list[EngineStats]
    regions: list[RegionStats]
    total: RegionStats
    #: Decoded instruction fields (``npu.isa.field_arrays``) for the trace's args; None when
    #: the profile was read back from JSON.
    fields: dict[str, np.ndarray] | None = None

    # Construction ----------------------------------------------------------------------------
    @classmethod
    def from_result(cls, result: RunResult, name: str | None = None) -> Profile:
        """Profile a finished run from its trace and the program's decoded fields.

        Instruction columns (int64 numpy arrays of length N): ``opcode``, ``engine`` (-1 for
        BARRIER/HALT, which the dispatcher handles), ``unit``, ``region`` (index into
        ``region_labels``), ``dispatch``, ``ready``, ``start``, ``complete``, ``end`` (the
        retire cycle), ``busy`` (cycles on its unit), ``stall_cycles`` (start - ready),
        ``stall_reason`` (:class:`Stall`), ``macs``, ``dram_read`` and ``dram_write`` (bytes).
        Instructions that never ran (after HALT) keep -1 cycles and count for nothing.
        """
        program, trace, cfg = result.program, result.trace, result.program.config
        n = program.n_instructions
        fields = field_arrays(program.instructions)
        opcode = fields["opcode"]
        unit, busy, _latency = timing_arrays(fields, cfg)
        engine = _ENGINE_OF[opcode]
        is_sync = opcode == Opcode.SYNC
        engine[is_sync] = fields["engine"][is_sync]
        start = np.asarray(trace.start, dtype=np.int64)
        ready = np.asarray(trace.ready, dtype=np.int64)
        ran = start >= 0
        stall_cycles = np.where(ran & (ready >= 0), np.maximum(start - ready, 0), 0)

        # Work and traffic, as the semantics in docs/architecture.md define them.
        runs = fields["n_inner"] * fields["n_outer"]
        macs = np.where(opcode == Opcode.MATMUL, runs * cfg.rows * cfg.cols, 0)
        rd = np.where((opcode == Opcode.LOAD) & (fields["fill"] == 0),
                      runs * fields["row_bytes"], 0)
        rd = rd + np.where(opcode == Opcode.GATHER, fields["n"] * (fields["row_bytes"] + 4), 0)
        wr = np.where(opcode == Opcode.STORE, runs * fields["row_bytes"], 0)
        macs, rd, wr = macs * ran, rd * ran, wr * ran

        # Regions: instructions before the first label form an "(unlabelled)" region.
        starts = [int(i) for i, _ in program.regions]
        labels = [str(label) for _, label in program.regions]
        if not starts or starts[0] > 0:
            starts, labels = [0, *starts], [UNLABELLED, *labels]
        starts_arr = np.asarray(starts, dtype=np.int64)
        region = (np.searchsorted(starts_arr, np.arange(n), side="right") - 1).astype(np.int64)

        cols = {
            "opcode": opcode, "engine": engine, "unit": unit, "region": region,
            "dispatch": np.asarray(trace.dispatch, dtype=np.int64), "ready": ready,
            "start": start, "complete": np.asarray(trace.complete, dtype=np.int64),
            "end": np.asarray(trace.retire, dtype=np.int64), "busy": busy,
            "stall_cycles": stall_cycles, "stall_reason": np.asarray(trace.stall, np.int64),
            "macs": macs, "dram_read": rd, "dram_write": wr,
        }
        prof = cls._aggregate(cfg, name or str(program.metadata.get("name", "program")),
                              int(result.cycles), labels, starts_arr, cols)
        prof.fields = fields
        return prof

    @classmethod
    def _aggregate(cls, cfg: NPUConfig, name: str, cycles: int, labels: list[str],
                   starts: np.ndarray, cols: dict[str, np.ndarray]) -> Profile:
        """Per-engine, per-region and total figures from the instruction columns."""
        n = len(cols["opcode"])
        engines = [_engine_stats(e, cols, cycles) for e in Engine]
        engines.append(_dispatcher_stats(cols, cycles))

        regions: list[RegionStats] = []
        if n:
            ran_eng = (cols["start"] >= 0) & (cols["engine"] >= 0)
            big = np.iinfo(np.int64).max
            first_start = np.minimum.reduceat(np.where(ran_eng, cols["start"], big), starts)
            last_end = np.maximum.reduceat(np.where(ran_eng, cols["end"], -1), starts)
            sums = {k: np.add.reduceat(cols[k], starts) for k in ("macs", "dram_read",
                                                                  "dram_write")}
            bounds = [*starts.tolist(), n]
            # Share of the total: from the latest end so far to this region's end.
            edge = np.maximum.accumulate(np.maximum(last_end, 0))
            edge[-1] = max(cycles, int(edge[-1]))
            share = np.diff(np.concatenate(([0], edge)))
            for r, label in enumerate(labels):
                s = int(first_start[r]) if first_start[r] != big else -1
                e = int(last_end[r]) if s >= 0 else -1
                regions.append(_region(cfg, label, bounds[r], bounds[r + 1] - 1, s, e,
                                       max(e - s, 0), int(share[r]), int(sums["macs"][r]),
                                       int(sums["dram_read"][r]), int(sums["dram_write"][r])))
        total = _region(cfg, "total", 0, n - 1, 0, cycles, cycles, cycles,
                        int(cols["macs"].sum()), int(cols["dram_read"].sum()),
                        int(cols["dram_write"].sum()))
        return cls(cfg, name, cycles, list(labels), cols, engines, regions, total)

    # Derived totals ----------------------------------------------------------------------
    @property
    def n_instructions(self) -> int:
        return len(self.instructions["opcode"])

    @property
    def macs(self) -> int:
        return self.total.macs

    @property
    def utilization(self) -> float:
        """Array utilization: MACs / (cycles x PEs)."""
        return self.total.utilization

    @property
    def dram_read(self) -> int:
        return self.total.dram_read

    @property
    def dram_write(self) -> int:
        return self.total.dram_write

    @property
    def read_bandwidth_utilization(self) -> float:
        """Bytes read / (cycles x dram_beat_bytes): the read channel's load."""
        return self.dram_read / (self.cycles * self.config.dram_beat_bytes) if self.cycles else 0.0

    @property
    def write_bandwidth_utilization(self) -> float:
        """Bytes written / (cycles x dram_beat_bytes): the write channel's load."""
        return (self.dram_write / (self.cycles * self.config.dram_beat_bytes)
                if self.cycles else 0.0)

    def engine(self, name: str) -> EngineStats:
        """The stats of engine ``name`` ("LD", "EX", "VX", "ST" or "DISP")."""
        for e in self.engines:
            if e.name == name:
                return e
        raise KeyError(f"no engine {name!r}; engines are {[e.name for e in self.engines]}")

    def instruction(self, index: int) -> dict[str, Any]:
        """One instruction's row as plain values with enum names."""
        row: dict[str, Any] = {"index": index}
        for key, col in self.instructions.items():
            row[key] = int(col[index])
        row["opcode"] = _OPNAME[row["opcode"]]
        row["engine"] = _ENGINE_NAMES[row["engine"]] if row["engine"] >= 0 else DISPATCHER
        row["unit"] = Unit(row["unit"]).name
        row["stall_reason"] = Stall(row["stall_reason"]).name
        row["region"] = self.region_labels[row["region"]]
        return row

    # Terminal table ----------------------------------------------------------------------
    def table(self, top_stalls: int = 5) -> str:
        """The profile as aligned text: header, per-region figures with the total, engine
        cycle accounting with stalls by reason, and the ``top_stalls`` longest stalls."""
        cfg = self.config
        t = self.total
        lines = [
            f"Profile of {self.name} on {cfg.name}: {cfg.rows}x{cfg.cols} array "
            f"({cfg.pes} MAC/cycle), DRAM {cfg.dram_beat_bytes} B/cycle per channel",
            f"cycles {self.cycles:,}   instructions {self.n_instructions:,}   "
            f"MACs {self.macs:,}   array utilization {100 * self.utilization:.1f}%",
            f"DRAM read {self.dram_read:,} B ({100 * self.read_bandwidth_utilization:.1f}% of "
            f"the read channel)   written {self.dram_write:,} B "
            f"({100 * self.write_bandwidth_utilization:.1f}% of the write channel)",
            "",
        ]
        head = ["region", "instrs", "start", "end", "span", "cycles", "MACs", "ideal", "util",
                "DRAM rd", "DRAM wr", "MAC/B", "bound"]
        rows = [_region_row(r) for r in self.regions]
        rows.append(None)
        rows.append(_region_row(t))
        lines += _format(head, rows)
        lines.append("")
        head = ["engine", "instrs", "busy", "stalled", "idle", "busy%", *_STALL_NAMES[1:]]
        rows = []
        for e in self.engines:
            if e.name == DISPATCHER:
                continue
            rows.append([e.name, f"{e.instructions:,}", f"{e.busy:,}", f"{e.stalled:,}",
                         f"{e.idle:,}", f"{100 * e.busy_fraction:.1f}%",
                         *[f"{e.stalled_by_reason.get(s, 0):,}" for s in _STALL_NAMES[1:]]])
        lines += _format(head, rows)
        d = self.engine(DISPATCHER)
        waits = ", ".join(f"{k} {v:,}" for k, v in d.stalled_by_reason.items() if v) or "none"
        lines.append(f"dispatcher: {d.instructions:,} dispatched, held {d.stalled:,} cycles "
                     f"({waits}), idle {d.idle:,} after HALT")
        if top_stalls > 0:
            sc = self.instructions["stall_cycles"]
            order = np.argsort(-sc, kind="stable")[:top_stalls]
            order = order[sc[order] > 0]
            if len(order):
                lines.append("")
                lines.append("longest stalls (cycles from ready to start):")
                rows = []
                for i in order.tolist():
                    r = self.instruction(i)
                    rows.append([str(i), r["opcode"], r["engine"], r["region"] or "-",
                                 f"{r['ready']:,}", f"{r['start']:,}", f"{r['stall_cycles']:,}",
                                 r["stall_reason"]])
                lines += _format(["instr", "opcode", "engine", "region", "ready", "start",
                                  "stall", "reason"], rows, indent="  ")
        return "\n".join(lines)

    # JSON ----------------------------------------------------------------------------------
    def to_dict(self, instructions: bool = True) -> dict[str, Any]:
        """Plain JSON-ready data. Instructions are stored column-wise (one list per quantity,
        enum columns by name) so 100k instructions stay compact; ``instructions=False``
        leaves them out."""
        out: dict[str, Any] = {
            "version": PROFILE_VERSION,
            "name": self.name,
            "time_unit": "cycle",
            "config": self.config.to_dict(),
            "totals": {
                "cycles": self.cycles,
                "instructions": self.n_instructions,
                "pes": self.config.pes,
                "macs": self.macs,
                "ideal_cycles": self.total.ideal_cycles,
                "array_utilization": self.utilization,
                "dram_read": self.dram_read,
                "dram_write": self.dram_write,
                "read_bandwidth_utilization": self.read_bandwidth_utilization,
                "write_bandwidth_utilization": self.write_bandwidth_utilization,
                "intensity": self.total.intensity,
                "memory_cycles": self.total.memory_cycles,
                "bound": self.total.bound,
            },
            "engines": [asdict(e) for e in self.engines],
            "regions": [asdict(r) for r in self.regions],
        }
        if instructions:
            cols: dict[str, Any] = {}
            for key, col in self.instructions.items():
                values = col.tolist()
                if key == "opcode":
                    values = [_OPNAME[v] for v in values]
                elif key == "engine":
                    values = [_ENGINE_NAMES[v] if v >= 0 else DISPATCHER for v in values]
                elif key in _ENUM_COLUMNS:
                    names = _ENUM_COLUMNS[key]
                    values = [names[v] for v in values]
                cols[key] = values
            out["region_labels"] = list(self.region_labels)
            out["instructions"] = cols
        return out

    def to_json(self, path: str | PathLike[str] | None = None, instructions: bool = True,
                indent: int | None = None) -> str:
        """:meth:`to_dict` as JSON text; written to ``path`` too when given."""
        text = json.dumps(self.to_dict(instructions), indent=indent, allow_nan=False)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Rebuild a profile written by :meth:`to_dict` (with its instructions); the figures
        are recomputed from the instruction columns, so they always agree with them."""
        if not isinstance(data, Mapping) or data.get("version") != PROFILE_VERSION:
            raise ValueError(f"not a profile of version {PROFILE_VERSION}")
        if "instructions" not in data:
            raise ValueError("the profile JSON has no instruction columns "
                             "(written with instructions=False)")
        cfg = NPUConfig.from_dict(data["config"])
        raw = data["instructions"]
        opnum = {op.name: int(op) for op in Opcode}
        engnum = {e.name: int(e) for e in Engine} | {DISPATCHER: -1}
        cols: dict[str, np.ndarray] = {}
        try:
            cols["opcode"] = np.array([opnum[v] for v in raw["opcode"]], dtype=np.int64)
            cols["engine"] = np.array([engnum[v] for v in raw["engine"]], dtype=np.int64)
            cols["unit"] = np.array([Unit[v] for v in raw["unit"]], dtype=np.int64)
            cols["stall_reason"] = np.array([Stall[v] for v in raw["stall_reason"]],
                                            dtype=np.int64)
            for key in _INT_COLUMNS:
                cols[key] = np.array(raw[key], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"profile JSON: unknown name or missing column {exc}") from None
        cols = {k: cols[k] for k in raw if k in cols}  # keep the writer's column order
        labels = list(data["region_labels"])
        region = cols["region"]
        starts = np.flatnonzero(np.r_[True, region[1:] != region[:-1]]) if len(region) else \
            np.zeros(0, np.int64)
        if len(starts) != len(labels):
            raise ValueError("profile JSON: region column does not match region_labels")
        return cls._aggregate(cfg, data["name"], int(data["totals"]["cycles"]), labels,
                              starts.astype(np.int64), cols)

    @classmethod
    def from_json(cls, text_or_path: str | PathLike[str]) -> Profile:
        """Read :meth:`to_json` output from a string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as fh:
                text = fh.read()
        return cls.from_dict(json.loads(text))

    # Perfetto --------------------------------------------------------------------------------
    def to_perfetto(self, path: str | PathLike[str] | None = None, *,
                    fields: bool = True) -> dict[str, Any]:
        """Chrome trace JSON (``{"traceEvents": [...]}``) for https://ui.perfetto.dev, as a
        dict; written to ``path`` too when given. See :meth:`to_perfetto_json`."""
        text = self.to_perfetto_json(fields=fields)
        if path is not None:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        return json.loads(text)

    def write_perfetto(self, path: str | PathLike[str], *, fields: bool = True) -> None:
        """Write the Chrome trace to ``path`` (without parsing it back as :meth:`to_perfetto`
        does)."""
        text = self.to_perfetto_json(fields=fields)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)

    def to_perfetto_json(self, *, fields: bool = True) -> str:
        """The Chrome trace as JSON text (built directly as text: 100k instructions take about
        a second).

        Time unit: **1 us = 1 cycle** (``ts``/``dur`` are cycle numbers). One process (the NPU
        and its config); threads: the dispatcher, the region lanes, and per engine one thread
        per unit (EX has two, weights and array, because PRELOAD and MATMUL overlap) plus a
        thread of its stalls. An instruction is an "X" slice ``[start, start + busy)`` on its
        unit (a unit never overlaps itself, so slices nest cleanly) with its index, region,
        cycle numbers (dispatch, ready, start, complete, end = retire), stall and, when
        ``fields`` and known, its fields in ``args``; SYNC is an instant event on its engine's
        thread; BARRIER/HALT are 1-cycle slices on the dispatcher at their dispatch; a stall is
        a slice ``[ready, start)`` named by its reason; the dispatcher's held cycles (full
        queue, BARRIER drain) are slices; a region is a slice from its first start to its last
        retirement, on as many lanes as overlapping regions need.
        """
        cfg, cols = self.config, self.instructions
        meta: list[dict[str, Any]] = [
            {"ph": "M", "pid": 1, "tid": 0, "name": "process_name",
             "args": {"name": f"NPU {cfg.name} ({cfg.rows}x{cfg.cols} PEs): {self.name}"}},
        ]
        tids: dict[str, int] = {}

        def thread(name: str) -> int:
            tid = tids.setdefault(name, len(tids) + 1)
            if len(meta) < 2 * tid + 1:
                meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name",
                             "args": {"name": name}})
                meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index",
                             "args": {"sort_index": tid}})
            return tid

        # Track order: dispatcher, region lanes, then each engine's units and its stalls.
        thread("dispatcher")
        lanes = _region_lanes(self.regions)
        lane_tid = [thread("regions" if k == 0 else f"regions ({k + 1})")
                    for k in range(max(lanes, default=-1) + 1)]
        unit_tid = np.zeros(len(Unit), dtype=np.int64)
        stall_tid = np.zeros(len(Engine), dtype=np.int64)
        for e in Engine:
            for u in _UNITS_OF_ENGINE[e]:
                if u != Unit.NONE:
                    unit_tid[u] = thread(_UNIT_TRACK[Unit(u)])
            stall_tid[e] = thread(f"{e.name} stalls")
        engine_tid = np.array([unit_tid[_MAIN_UNIT[e]] for e in Engine] + [tids["dispatcher"]])

        small: list[dict[str, Any]] = list(meta)
        for r, lane in zip(self.regions, lanes):
            if r.start >= 0:
                small.append({"ph": "X", "pid": 1, "tid": lane_tid[lane], "name": r.label,
                              "cat": "region", "ts": r.start, "dur": r.span,
                              "args": {"cycles": r.cycles, "first_instruction": r.first,
                                       "last_instruction": r.last, "macs": r.macs,
                                       "utilization": round(r.utilization, 4),
                                       "dram_read": r.dram_read, "dram_write": r.dram_write,
                                       "bound": r.bound}})
        for i, d, gap, why in _dispatch_gaps(cols):
            small.append({"ph": "X", "pid": 1, "tid": tids["dispatcher"], "name": f"held: {why}",
                          "cat": "dispatch", "ts": d - gap, "dur": gap,
                          "args": {"index": i, "opcode": _OPNAME[cols["opcode"][i]],
                                   "dispatch": d}})
        parts = [json.dumps(ev, separators=(",", ":")) for ev in small]

        ran = cols["start"] >= 0
        eng, unit = cols["engine"], cols["unit"]
        on_unit = ran & (unit != Unit.NONE)
        parts += self._events(on_unit, '"ph":"X"', unit_tid[unit], cols["start"], cols["busy"],
                              fields)
        syncs = ran & (unit == Unit.NONE) & (eng >= 0)
        parts += self._events(syncs, '"ph":"i","s":"t"', engine_tid[eng], cols["start"], None,
                              fields)
        own = (cols["dispatch"] >= 0) & (eng < 0)
        parts += self._events(own, '"ph":"X"', engine_tid[eng], cols["dispatch"],
                              np.ones_like(eng), fields)
        # Stalls: [ready, start) on the engine's stall thread (disjoint per engine).
        st = np.flatnonzero(ran & (eng >= 0) & (cols["stall_cycles"] > 0))
        template = ('{"ph":"X","pid":1,"tid":%d,"name":"stall %s","cat":"stall","ts":%d,'
                    '"dur":%d,"args":{"index":%d,"opcode":"%s","reason":"%s","ready":%d,'
                    '"start":%d}}')
        why = [_STALL_NAMES[v] for v in cols["stall_reason"][st].tolist()]
        ops = [_OPNAME[v] for v in cols["opcode"][st].tolist()]
        parts += [template % row for row in zip(
            stall_tid[eng[st]].tolist(), why, cols["ready"][st].tolist(),
            cols["stall_cycles"][st].tolist(), st.tolist(), ops, why,
            cols["ready"][st].tolist(), cols["start"][st].tolist())]

        other = json.dumps({"time_unit": "1 us = 1 cycle", "program": self.name,
                            "config": cfg.name, "cycles": self.cycles})
        return '{"traceEvents":[' + ",\n".join(parts) + '],"otherData":' + other + "}"

    def _events(self, mask: np.ndarray, phase: str, tid: np.ndarray, ts: np.ndarray,
                dur: np.ndarray | None, with_fields: bool) -> list[str]:
        """JSON text of one trace event per selected instruction, formatted per opcode from
        a template (the fields differ by opcode) over whole columns at once."""
        cols = self.instructions
        labels = [json.dumps(label) for label in self.region_labels]
        engine_json = [json.dumps(name) for name in (*_ENGINE_NAMES, DISPATCHER)]
        mask_json = [json.dumps(_mask_names(m)) for m in range(16)]
        keys = ("dispatch", "ready", "start", "complete", "end", "busy", "stall_cycles")
        out: list[str] = []
        for op in Opcode:
            sel = np.flatnonzero(mask & (cols["opcode"] == op))
            if not len(sel):
                continue
            head = '{' + phase + ',"pid":1,"tid":%d,"name":"' + op.name + \
                '","cat":"instruction","ts":%d,' + ('"dur":%d,' if dur is not None else "")
            body = ('"args":{"index":%d,"opcode":"' + op.name + '","engine":%s,"region":%s,'
                    + ",".join(f'"{k}":%d' for k in keys) + ',"stall_reason":"%s"')
            columns: list[list[Any]] = [tid[sel].tolist(), ts[sel].tolist()]
            if dur is not None:
                columns.append(dur[sel].tolist())
            columns += [sel.tolist(), [engine_json[v] for v in cols["engine"][sel].tolist()],
                        [labels[v] for v in cols["region"][sel].tolist()]]
            columns += [cols[k][sel].tolist() for k in keys]
            columns.append([_STALL_NAMES[v] for v in cols["stall_reason"][sel].tolist()])
            if with_fields and self.fields is not None:
                names = [k for k in LAYOUTS[op] if k != "opcode"]
                body += ',"fields":{' + ",".join(
                    f'"{k}":%s' if k in ("wait", "signal") else f'"{k}":%d' for k in names) + "}"
                for k in names:
                    values = self.fields[k][sel].tolist()
                    columns.append([mask_json[v] for v in values] if k in ("wait", "signal")
                                   else values)
            template = head + body + "}}"
            out += [template % row for row in zip(*columns)]
        return out

    # Plot ------------------------------------------------------------------------------------
    def plot(self, path: str | PathLike[str], *, width_px: int = 1600, dpi: int = 100) -> None:
        """Write a PNG: the engine timeline (a Gantt row per unit, bars coloured by opcode,
        regions shaded) above a utilization panel (per-region array utilization) and a
        roofline (regions as points). Bars closer than a pixel are merged, so 100k+
        instructions plot in about a second."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width_px / dpi, 0.62 * width_px / dpi), dpi=dpi)
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 2, height_ratios=[1.0, 1.0], hspace=0.55, wspace=0.22,
                                left=0.08, right=0.98, top=0.93, bottom=0.12)
        self._plot_timeline(fig.add_subplot(grid[0, :]), width_px)
        self._plot_utilization(fig.add_subplot(grid[1, 0]))
        self._plot_roofline(fig.add_subplot(grid[1, 1]))
        fig.suptitle(f"{self.name} on {self.config.name}: {self.cycles:,} cycles, array "
                     f"utilization {100 * self.utilization:.1f}%", fontsize=12)
        fig.savefig(path, format="png")

    def _plot_timeline(self, ax: Any, width_px: int) -> None:
        from matplotlib.patches import Patch

        cols = self.instructions
        units = [u for e in Engine for u in _UNITS_OF_ENGINE[e] if u != Unit.NONE]
        colours = _opcode_colours()
        # One bin per pixel column: a bar's height is the fraction of the bin's cycles the unit
        # was busy with that opcode (exact for short programs, honest for 100k+ instructions).
        n_bins = max(min(width_px, 4 * max(self.cycles, 1)), 1)
        edges = np.linspace(0.0, max(self.cycles, 1), n_bins + 1)
        ran = cols["start"] >= 0
        seen: set[int] = set()
        for k, u in enumerate(units):
            row = k + 1  # row 0 holds the regions
            sel = ran & (cols["unit"] == u)
            filled = np.zeros(n_bins)
            for code in np.unique(cols["opcode"][sel]).tolist():
                mine = sel & (cols["opcode"] == code)
                s = cols["start"][mine]
                ms, me = _union(s, s + cols["busy"][mine])
                share = np.diff(_covered(ms, me, edges)) / np.diff(edges)
                top, bottom = row + 0.4 - 0.8 * (filled + share), row + 0.4 - 0.8 * filled
                ax.fill_between(edges, np.append(top, top[-1]), np.append(bottom, bottom[-1]),
                                step="post", color=colours[code], linewidth=0)
                filled += share
                seen.add(code)
        # Regions: a row of bars (overlapping regions on stacked lanes) plus light shading,
        # drawn as one collection per tone (hundreds of regions stay fast).
        lanes = _region_lanes(self.regions)
        n_lanes = max(lanes, default=0) + 1
        height = 0.8 / n_lanes
        for tone_index, tone in enumerate(("silver", "tab:gray")):
            mine = [(r, lane) for j, (r, lane) in enumerate(zip(self.regions, lanes))
                    if j % 2 == tone_index and r.start >= 0 and r.span > 0]
            for lane in range(n_lanes):
                bars = [(r.start, r.span) for r, ln in mine if ln == lane]
                if bars:
                    ax.broken_barh(bars, (-0.4 + lane * height, height), facecolors=tone,
                                   edgecolors="white", linewidth=0.5)
            if mine:
                ax.broken_barh([(r.start, r.span) for r, _ in mine], (0.5, len(units)),
                               facecolors=tone, alpha=0.07, linewidth=0, zorder=0)
        for r, lane in zip(self.regions, lanes):
            if r.start >= 0 and r.span >= self.cycles / 25:
                ax.text(r.start + r.span / 2, -0.4 + (lane + 0.5) * height, r.label,
                        ha="center", va="center", fontsize=7, clip_on=True)
        labels = {Unit.EX_WEIGHTS: "EX weights", Unit.EX_ARRAY: "EX array"}
        ax.set_yticks(range(len(units) + 1))
        ax.set_yticklabels(["regions"] + [labels.get(Unit(u), _UNIT_TRACK[Unit(u)])
                                          for u in units])
        ax.set_ylim(len(units) + 0.6, -0.6)
        ax.set_xlim(0, max(self.cycles, 1))
        ax.set_xlabel("cycle")
        ax.set_title("engine timeline (bar height: fraction of the cycles a unit is busy, by "
                     "opcode)", fontsize=10)
        ax.legend(handles=[Patch(color=colours[c], label=_OPNAME[c]) for c in sorted(seen)],
                  loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=7,
                  ncol=max(len(seen), 1), frameon=False)

    def _plot_utilization(self, ax: Any) -> None:
        regions = [r for r in self.regions if r.instructions]
        x = np.arange(len(regions))
        util = [100 * r.utilization for r in regions]
        colour = ["tab:blue" if r.bound == "compute" else "tab:orange" if r.bound == "memory"
                  else "0.6" for r in regions]
        ax.bar(x, util, color=colour, width=0.8)
        ax.axhline(100 * self.utilization, color="k", linestyle="--", linewidth=1,
                   label=f"total {100 * self.utilization:.1f}%")
        ax.set_ylim(0, max([100.0, *util]) * 1.02)  # > 100%: finished in an earlier one's shadow
        ax.set_ylabel("array utilization (%)")
        step = max(1, math.ceil(len(regions) / 40))
        ax.set_xticks(x[::step])
        ax.set_xticklabels([r.label for r in regions][::step], rotation=60, ha="right",
                           fontsize=7)
        ax.set_title("utilization per region (blue: compute-bound, orange: memory-bound)",
                     fontsize=10)
        ax.legend(fontsize=8, loc="upper right")

    def _plot_roofline(self, ax: Any) -> None:
        cfg = self.config
        peak, beat = cfg.pes, cfg.dram_beat_bytes
        pts = [(r.macs / max(r.dram_read, r.dram_write), r.macs_per_cycle, r.label)
               for r in self.regions if r.macs > 0 and r.cycles > 0
               and max(r.dram_read, r.dram_write) > 0]
        xs = [p[0] for p in pts] or [peak / beat]
        lo, hi = min(min(xs), peak / beat) / 4, max(max(xs), peak / beat) * 4
        grid = np.geomspace(lo, hi, 200)
        ax.loglog(grid, np.minimum(peak, grid * beat), color="k", linewidth=1.5,
                  label=f"roof: min({peak} MAC/cycle, {beat} B/cycle x intensity)")
        if pts:
            ax.scatter(xs, [p[1] for p in pts], s=18, color="tab:red", zorder=3,
                       label="regions")
            if len(pts) <= 16:
                placed: set[tuple[float, float]] = set()
                for x, y, label in pts:  # one label per spot: tiles of a layer often coincide
                    spot = (round(math.log10(x), 2), round(math.log10(max(y, 1e-9)), 2))
                    if spot not in placed:
                        placed.add(spot)
                        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        if self.total.macs and max(self.dram_read, self.dram_write):
            ax.scatter([self.macs / max(self.dram_read, self.dram_write)],
                       [self.macs / max(self.cycles, 1)], marker="*", s=80, color="k",
                       zorder=4, label="total")
        ax.set_xlabel("MACs per DRAM byte (on the busier channel)")
        ax.set_ylabel("MACs per cycle")
        ax.set_ylim(bottom=max(min([p[1] for p in pts], default=1.0) / 4, 1e-3), top=peak * 2)
        ax.set_title("roofline", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _engine_stats(e: Engine, cols: Mapping[str, np.ndarray], cycles: int) -> EngineStats:
    """busy = union of the engine's unit intervals; stalled = head-waiting cycles not covered
    by busy (a UNIT stall behind a busy unit is busy time, not lost time); idle = the rest."""
    mine = (cols["engine"] == e) & (cols["start"] >= 0)
    on_unit = mine & (cols["unit"] != Unit.NONE)
    s = cols["start"][on_unit]
    ms, me = _union(s, s + cols["busy"][on_unit])
    busy = int((me - ms).sum())
    waiting = mine & (cols["stall_cycles"] > 0)
    ready, start = cols["ready"][waiting], cols["start"][waiting]
    lost = (start - ready) - (_covered(ms, me, start) - _covered(ms, me, ready))
    by_reason = np.bincount(cols["stall_reason"][waiting], weights=lost,
                            minlength=len(Stall)).astype(np.int64)
    stalled = int(lost.sum())
    reasons = {name: int(by_reason[k]) for k, name in enumerate(_STALL_NAMES) if k}
    return EngineStats(e.name, int(mine.sum()), busy, stalled, cycles - busy - stalled, reasons)


def _dispatch_gaps(cols: Mapping[str, np.ndarray]) -> list[tuple[int, int, int, str]]:
    """(instruction, dispatch cycle, cycles held before it, why) for every dispatch that came
    later than one cycle after the previous one."""
    d = cols["dispatch"]
    idx = np.flatnonzero(d >= 0)
    if not len(idx):
        return []
    dd = d[idx]
    prev = np.concatenate(([-1], dd[:-1]))
    gap = dd - prev - 1
    held = np.flatnonzero(gap > 0)
    out = []
    for j in held.tolist():
        i = int(idx[j])
        op = int(cols["opcode"][i])
        e = int(cols["engine"][i])
        why = "BARRIER drain" if op == Opcode.BARRIER else \
            f"{_ENGINE_NAMES[e]} queue full" if e >= 0 else "dispatch"
        out.append((i, int(dd[j]), int(gap[j]), why))
    return out


def _dispatcher_stats(cols: Mapping[str, np.ndarray], cycles: int) -> EngineStats:
    """busy = cycles in which it dispatched; stalled = cycles it was held before HALT."""
    dispatched = int((cols["dispatch"] >= 0).sum())
    reasons: dict[str, int] = {"BARRIER drain": 0}
    reasons.update({f"{e.name} queue full": 0 for e in Engine})
    for _i, _d, gap, why in _dispatch_gaps(cols):
        reasons[why] = reasons.get(why, 0) + gap
    stalled = sum(reasons.values())
    return EngineStats(DISPATCHER, dispatched, dispatched, stalled,
                       max(cycles - dispatched - stalled, 0), reasons)


def _region(cfg: NPUConfig, label: str, first: int, last: int, start: int, end: int,
            span: int, cycles: int, macs: int, rd: int, wr: int) -> RegionStats:
    ideal = macs / cfg.pes
    memory = max(rd, wr) / cfg.dram_beat_bytes
    return RegionStats(
        label=label, first=first, last=last, instructions=max(last - first + 1, 0),
        start=start, end=end, span=span, cycles=cycles, macs=macs, ideal_cycles=ideal,
        utilization=macs / (cycles * cfg.pes) if cycles > 0 else 0.0,
        dram_read=rd, dram_write=wr, intensity=macs / (rd + wr) if rd + wr else None,
        memory_cycles=memory, bound=_bound(macs, ideal, memory))


def _region_lanes(regions: Sequence[RegionStats]) -> list[int]:
    """Lane of each region so that regions on one lane never overlap (greedy colouring in
    start order, which uses the fewest lanes)."""
    lanes = [0] * len(regions)
    free: list[int] = []  # end cycle of each lane's last region
    for j in sorted(range(len(regions)), key=lambda k: regions[k].start):
        r = regions[j]
        if r.start < 0:
            continue
        for lane, end in enumerate(free):
            if end <= r.start:
                lanes[j], free[lane] = lane, r.end
                break
        else:
            lanes[j] = len(free)
            free.append(r.end)
    return lanes


def _opcode_colours() -> dict[int, str]:
    palette = ["tab:blue", "tab:cyan", "tab:purple", "tab:red", "tab:green", "tab:olive",
               "tab:orange", "tab:gray", "tab:brown", "tab:pink"]
    return {int(op): palette[k % len(palette)] for k, op in enumerate(Opcode)}


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 or x == int(x) else f"{x:,.1f}"


def _region_row(r: RegionStats) -> list[str]:
    span = r.start >= 0
    return [r.label or "-", f"{r.instructions:,}", f"{r.start:,}" if span else "-",
            f"{r.end:,}" if span else "-", f"{r.span:,}", f"{r.cycles:,}", f"{r.macs:,}",
            _num(r.ideal_cycles),
            f"{100 * r.utilization:.1f}%", f"{r.dram_read:,}", f"{r.dram_write:,}",
            "-" if r.intensity is None else f"{r.intensity:.2f}", r.bound]


def _format(head: list[str], rows: list[list[str] | None], indent: str = "") -> list[str]:
    """Aligned columns: the first left-aligned, the others right-aligned; None = a rule."""
    body = [r for r in rows if r is not None]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells: list[str]) -> str:
        parts = [str(c).ljust(w) if k == 0 else str(c).rjust(w)
                 for k, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    out = [line(head)]
    out.append(indent + "  ".join("-" * w for w in widths))
    for r in rows:
        out.append(indent + "  ".join("-" * w for w in widths) if r is None else line(r))
    return out
