"""The instruction stream: instructions in program order, tokens derived from memory footprints.

The emitters append instructions without any token: the *program order* defines what the
program means, as if one instruction ran after the other. :class:`Stream` records, for each
instruction, the SPAD/ACC rows and DRAM bytes it reads and writes, and finds its hazards
against earlier instructions of *other* engines (same-engine order is kept by the machine:
in-order start, ELTWISE waits for the previous VX result):

* read after write (RAW) on the last writer of every block read,
* write after read (WAR) on the last readers, and write after write (WAW) on the last writer.

Footprints are tracked in blocks (``cols`` rows of SPAD/ACC, 64 bytes of DRAM): a coarser block
can only add a dependency on an earlier instruction, never drop one, so it costs at most a
little overlap, and the emitters align their buffers to blocks. DRAM constants (weights,
parameters) are never written and are not tracked.

:meth:`Stream.assign_tokens` then turns the hazards into ``wait``/``signal`` masks with vector
clocks: each instruction knows, per engine, the latest instruction known to have *retired*
before it starts (in-order retirement makes that a prefix); a hazard already covered needs no
token, an uncovered one makes the producer signal and the consumer wait. Because the hazards of
successive consumers of one engine on one producer engine are increasing, the k-th wait on a
token counter always pairs with the k-th signal, and every wait points backwards in program
order, so no program emitted this way can deadlock. A bound on the tokens outstanding per
counter is checked against ``token_max``.

:meth:`Stream.encode` packs everything into the (N, 4) uint64 words of ``npu.isa`` at once
(the field layout is read from ``npu.isa.LAYOUTS``).
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from npu.compiler.errors import CompileError
from npu.isa import INSTR_WORDS, LAYOUTS, OPCODE_ENGINE, Engine, NPUConfig, Opcode
from npu.program import label_region

__all__ = ["Stream", "DRAM_BLOCK"]

_N_ENG = len(Engine)
LD, EX, VX, ST = (int(e) for e in (Engine.LD, Engine.EX, Engine.VX, Engine.ST))
#: DRAM tracking granularity in bytes (buffers are aligned to it).
DRAM_BLOCK = 64
#: Body field names of each opcode in encoding order (header excluded).
_BODY = {op: tuple(k for k in LAYOUTS[op] if k not in ("opcode", "wait", "signal"))
         for op in Opcode}


class _Space:
    """Last writer (per engine) and last reader (per engine) of every block.

    Bookkeeping is lazy, since the array's inner loop issues long runs of reads with no write in
    between: reads are answered from a per-range cache until the next write and their reader
    updates are applied only when a write needs them; a write repeating the previous one (same
    range and engine, nothing else touched the space since) only advances its index."""

    def __init__(self, size: int, writers: tuple[int, ...], readers: tuple[int, ...],
                 block: int) -> None:
        self.block = block
        n = -(-size // block) + 1
        self.writers = {e: [-1] * n for e in writers}
        self.readers = {e: [-1] * n for e in readers}
        self._wlist = list(self.writers.items())
        self.pending: dict[tuple[int, int, int], int] = {}   # reads not applied to readers
        self.cache: dict[tuple[int, int, int], tuple[tuple[int, int], ...]] = {}
        self.last: tuple[int, int, int] | None = None      # a write nothing touched since
        self.last_idx = -1

    def _settle(self) -> None:
        if self.last is not None:
            a, z, eng = self.last
            self.writers[eng][a:z] = [self.last_idx] * (z - a)
            self.last = None

    def read(self, lo: int, hi: int, eng: int, idx: int, deps: list[int]) -> None:
        b = self.block
        a, z = lo // b, -(-hi // b)
        if self.last is not None:
            self._settle()
        key = (a, z, eng)
        hit = self.cache.get(key)
        if hit is None:
            if z - a == 1:
                hit = tuple((e, arr[a]) for e, arr in self._wlist if e != eng and arr[a] >= 0)
            else:
                hit = tuple((e, m) for e, arr in self._wlist if e != eng
                            for m in (max(arr[a:z]),) if m >= 0)
            self.cache[key] = hit
        for e, m in hit:
            if m > deps[e]:
                deps[e] = m
        self.pending[key] = idx

    def _flush(self) -> None:
        if self.pending:
            for (a, z, eng), idx in sorted(self.pending.items(), key=lambda kv: kv[1]):
                self.readers[eng][a:z] = [idx] * (z - a)
            self.pending.clear()

    def write(self, lo: int, hi: int, eng: int, idx: int, deps: list[int]) -> None:
        b = self.block
        a, z = lo // b, -(-hi // b)
        key = (a, z, eng)
        if self.last == key and not self.pending:
            self.last_idx = idx     # the same write again: nothing foreign in between
            return
        self._settle()
        self._flush()
        self.cache.clear()
        blank = [-1] * (z - a)
        for e, arr in self.writers.items():
            if e != eng:
                m = max(arr[a:z])
                if m > deps[e]:
                    deps[e] = m
                arr[a:z] = blank
        for e, arr in self.readers.items():
            if e != eng:
                m = max(arr[a:z])
                if m > deps[e]:
                    deps[e] = m
            arr[a:z] = blank
        self.last = key
        self.last_idx = idx


class Stream:
    """Instructions of one program, in order, with their cross-engine hazards."""

    def __init__(self, config: NPUConfig, dram_bytes: int, const_end: int = 0) -> None:
        self.cfg = config
        self.opcodes: list[int] = []
        self.fields: list[tuple[int, ...]] = []
        self.engines: list[int] = []
        self.deps: list[list[int] | None] = []
        self.wait: list[int] = []
        self.signal: list[int] = []
        self.regions: list[tuple[int, str]] = []
        blk = config.rows
        self.spad = _Space(config.spad_rows, (LD, VX), (EX, VX, ST), blk)
        self.acc = _Space(config.acc_rows, (LD, EX), (EX, VX, ST), blk)
        self.dram = _Space(max(dram_bytes, 1), (ST,), (LD,), DRAM_BLOCK)
        self.const_end = const_end   # DRAM below this holds constants only (never written)

    def __len__(self) -> int:
        return len(self.opcodes)

    def region(self, label: str) -> None:
        """Label the instructions emitted from now on (a layer name, for the profile)."""
        label_region(self.regions, len(self.opcodes), label)

    def _add(self, op: int, eng: int, fields: tuple[int, ...]) -> tuple[int, list[int]]:
        idx = len(self.opcodes)
        self.opcodes.append(op)
        self.fields.append(fields)
        self.engines.append(eng)
        deps = [-1, -1, -1, -1]
        self.deps.append(deps)
        return idx, deps

    def _dram_read(self, lo: int, hi: int, idx: int, deps: list[int]) -> None:
        if hi > self.const_end:
            self.dram.read(max(lo, self.const_end), hi, LD, idx, deps)

    # Instructions -------------------------------------------------------------------------
    def load(self, *, dst: int, n_inner: int, row_bytes: int, dram_addr: int = 0,
             dram_stride_inner: int = 0, n_outer: int = 1, dram_stride_outer: int = 0,
             dst_stride_outer: int = 0, mem: int = 0, fill: int = 0, fill_value: int = 0) -> int:
        """LOAD (DRAM or fill -> SPAD/ACC rows)."""
        idx, deps = self._add(_LOAD, LD, (
            dram_addr, dram_stride_outer, dram_stride_inner, dst, dst_stride_outer, n_inner,
            n_outer, row_bytes, mem, fill, fill_value))
        if not fill:
            end = dram_addr + (n_outer - 1) * dram_stride_outer + \
                (n_inner - 1) * dram_stride_inner + row_bytes
            self._dram_read(dram_addr, end, idx, deps)
        space = self.acc if mem else self.spad
        space.write(dst, dst + (n_outer - 1) * dst_stride_outer + n_inner, LD, idx, deps)
        return idx

    def gather(self, *, dram_addr: int, index_addr: int, row_stride: int, dst: int, n: int,
               row_bytes: int, table_bytes: int, mem: int = 0) -> int:
        """GATHER (table rows by an int32 index list -> SPAD/ACC rows)."""
        idx, deps = self._add(_GATHER, LD, (dram_addr, index_addr, row_stride, dst, n,
                                            row_bytes, mem))
        self._dram_read(index_addr, index_addr + 4 * n, idx, deps)
        self._dram_read(dram_addr, dram_addr + table_bytes, idx, deps)
        (self.acc if mem else self.spad).write(dst, dst + n, LD, idx, deps)
        return idx

    def preload(self, spad_addr: int) -> int:
        """PRELOAD (SPAD weight tile -> shadow bank)."""
        idx, deps = self._add(_PRELOAD, EX, (spad_addr,))
        self.spad.read(spad_addr, spad_addr + self.cfg.rows, EX, idx, deps)
        return idx

    def matmul(self, *, spad_addr: int, acc_addr: int, n_inner: int, n_outer: int = 1,
               spad_stride_inner: int = 1, spad_stride_outer: int = 0, accumulate: int = 0,
               swap: int = 0) -> int:
        """MATMUL (SPAD rows through the array -> ACC rows)."""
        idx, deps = self._add(_MATMUL, EX, (
            spad_addr, spad_stride_outer, spad_stride_inner, acc_addr, n_inner, n_outer,
            accumulate, swap))
        last = spad_addr + (n_outer - 1) * spad_stride_outer + (n_inner - 1) * spad_stride_inner
        self.spad.read(spad_addr, last + 1, EX, idx, deps)
        self.acc.write(acc_addr, acc_addr + n_inner * n_outer, EX, idx, deps)
        return idx

    def vector(self, *, acc_addr: int, spad_addr: int, param_addr: int, n: int,
               zero_point: int, clamp_min: int = -128, clamp_max: int = 127,
               fp32: int = 0) -> int:
        """VECTOR (ACC rows -> requantized SPAD rows); ``fp32``: float32 scales in the
        multiplier row (onnxruntime's requantization, see :func:`npu.numerics.requantize`)."""
        idx, deps = self._add(_VECTOR, VX, (acc_addr, spad_addr, param_addr, n, zero_point,
                                            clamp_min, clamp_max, fp32))
        self.acc.read(acc_addr, acc_addr + n, VX, idx, deps)
        self.acc.read(param_addr, param_addr + 3, VX, idx, deps)
        self.spad.write(spad_addr, spad_addr + n, VX, idx, deps)
        return idx

    def eltwise(self, *, func: int, a_addr: int, b_addr: int, dst: int, n_inner: int,
                n_outer: int = 1, a_stride_inner: int = 1, a_stride_outer: int = 0,
                b_stride_inner: int = 1, b_stride_outer: int = 0, a_zero: int = 0,
                b_zero: int = 0, a_mult: int = 0, b_mult: int = 0, shift: int = 0,
                zero_point: int = 0, clamp_min: int = -128, clamp_max: int = 127) -> int:
        """ELTWISE (SPAD op SPAD -> SPAD)."""
        idx, deps = self._add(_ELTWISE, VX, (
            func, a_addr, b_addr, shift, dst, a_stride_outer, b_stride_outer, n_inner,
            a_stride_inner, b_stride_inner, a_mult, b_mult, n_outer, a_zero, b_zero,
            zero_point, clamp_min, clamp_max))
        for addr, si, so in ((a_addr, a_stride_inner, a_stride_outer),
                             (b_addr, b_stride_inner, b_stride_outer)):
            last = addr + (n_outer - 1) * so + (n_inner - 1) * si
            self.spad.read(addr, last + 1, VX, idx, deps)
        self.spad.write(dst, dst + n_inner * n_outer, VX, idx, deps)
        return idx

    def store(self, *, src: int, n_inner: int, row_bytes: int, dram_addr: int,
              dram_stride_inner: int, n_outer: int = 1, dram_stride_outer: int = 0,
              src_stride_outer: int = 0, mem: int = 0) -> int:
        """STORE (SPAD/ACC rows -> DRAM)."""
        idx, deps = self._add(_STORE, ST, (
            dram_addr, dram_stride_outer, dram_stride_inner, src, src_stride_outer, n_inner,
            n_outer, row_bytes, mem))
        (self.acc if mem else self.spad).read(src, src + (n_outer - 1) * src_stride_outer
                                              + n_inner, ST, idx, deps)
        end = dram_addr + (n_outer - 1) * dram_stride_outer + \
            (n_inner - 1) * dram_stride_inner + row_bytes
        if dram_addr < self.const_end:
            raise CompileError(f"internal: STORE into DRAM constants at {dram_addr}")
        self.dram.write(dram_addr, end, ST, idx, deps)
        return idx

    def barrier(self) -> int:
        """BARRIER: everything before retires before anything after is dispatched."""
        idx, _ = self._add(int(Opcode.BARRIER), -1, ())
        return idx

    def halt(self) -> int:
        idx, _ = self._add(int(Opcode.HALT), -1, ())
        return idx

    # Tokens ------------------------------------------------------------------------------
    def assign_tokens(self) -> dict[str, int]:
        """Turn hazards into wait/signal masks (see the module doc). Returns token statistics."""
        n = len(self.opcodes)
        wait = [0] * n
        signal = [0] * n
        known: list[list[int]] = [None] * n   # type: ignore[list-item]
        state = [[-1] * _N_ENG for _ in range(_N_ENG)]   # frontier of each engine's last start
        last_idx = [-1] * _N_ENG
        sig_pos: dict[tuple[int, int], list[int]] = {}
        wait_pos: dict[tuple[int, int], list[int]] = {}
        waits = 0
        barrier = int(Opcode.BARRIER)
        engines, opcodes, all_deps = self.engines, self.opcodes, self.deps
        for i in range(n):
            e = engines[i]
            if e < 0:
                if opcodes[i] == barrier:
                    for k in range(_N_ENG):
                        state[k] = [max(a, b) for a, b in zip(state[k], last_idx)]
                continue
            k_now = state[e]
            copied = False
            deps = all_deps[i]
            for src in range(_N_ENG):
                p = deps[src]
                if p <= k_now[src] or src == e:
                    continue
                if not copied:
                    k_now = list(k_now)
                    copied = True
                signal[p] |= 1 << e
                wait[i] |= 1 << src
                waits += 1
                kp = known[p]
                for k in range(_N_ENG):
                    if kp[k] > k_now[k]:
                        k_now[k] = kp[k]
                if p > k_now[src]:
                    k_now[src] = p
                sig_pos.setdefault((src, e), []).append(p)
                wait_pos.setdefault((src, e), []).append(i)
            known[i] = k_now
            state[e] = k_now
            last_idx[e] = i
        self.wait, self.signal = wait, signal
        worst = self._check_outstanding(known, sig_pos, wait_pos)
        return {"waits": waits, "max_outstanding": worst}

    def _check_outstanding(self, known: list[list[int]],
                           sig_pos: dict[tuple[int, int], list[int]],
                           wait_pos: dict[tuple[int, int], list[int]]) -> int:
        """Bound the tokens pending on each counter: when the k-th signal of src->dst retires,
        at least the waits of dst up to what the signaller knows of dst have been consumed."""
        worst = 0
        for (src, dst), sigs in sig_pos.items():
            waits = wait_pos[(src, dst)]
            for k, p in enumerate(sigs):
                consumed = bisect_right(waits, known[p][dst])
                pending = k + 1 - consumed
                if pending > worst:
                    worst = pending
                    if pending > self.cfg.token_max:
                        raise CompileError(
                            f"internal: instruction {p} may leave {pending} tokens pending on "
                            f"{Engine(src).name}->{Engine(dst).name} (token_max "
                            f"{self.cfg.token_max}); the schedule runs one engine too far ahead")
        return worst

    # Encoding ----------------------------------------------------------------------------
    def encode(self) -> np.ndarray:
        """The (N, 4) uint64 instruction words (tokens must be assigned first)."""
        n = len(self.opcodes)
        if len(self.wait) != n:
            raise CompileError("internal: encode() before assign_tokens()")
        words = np.zeros((n, INSTR_WORDS), dtype=np.uint64)
        opcodes = np.array(self.opcodes, dtype=np.int64)
        waits = np.array(self.wait, dtype=np.int64)
        signals = np.array(self.signal, dtype=np.int64)
        for op in np.unique(opcodes):
            opc = Opcode(int(op))
            sel = np.flatnonzero(opcodes == op)
            layout = LAYOUTS[opc]
            cols: dict[str, np.ndarray] = {"opcode": np.full(len(sel), int(op), np.int64),
                                           "wait": waits[sel], "signal": signals[sel]}
            body = _ORDER.get(int(op), _BODY[opc])
            if body:
                mat = np.array([self.fields[i] for i in sel.tolist()], dtype=np.int64)
                for j, k in enumerate(body):
                    cols[k] = mat[:, j]
            part = np.zeros((len(sel), INSTR_WORDS), dtype=np.uint64)
            for key, f in layout.items():
                v = cols[key]
                bad = (v < f.lo) | (v > f.hi)
                if bad.any():
                    first = int(np.flatnonzero(bad)[0])
                    raise CompileError(f"internal: instruction {int(sel[first])} ({opc.name}) "
                                       f"field {key}={int(v[first])} is out of range "
                                       f"[{f.lo}, {f.hi}]")
                raw = (v & ((1 << f.width) - 1)).astype(np.uint64)
                part[:, f.lsb // 64] |= raw << np.uint64(f.lsb % 64)
            words[sel] = part
        return words

    def engine_counts(self) -> dict[str, int]:
        """Instructions per opcode name (for reports)."""
        counts = np.bincount(np.array(self.opcodes, dtype=np.int64), minlength=16)
        return {Opcode(op).name: int(c) for op, c in enumerate(counts) if c and op in
                Opcode._value2member_map_}


_LOAD, _GATHER, _PRELOAD, _MATMUL, _VECTOR, _ELTWISE, _STORE = (
    int(o) for o in (Opcode.LOAD, Opcode.GATHER, Opcode.PRELOAD, Opcode.MATMUL, Opcode.VECTOR,
                     Opcode.ELTWISE, Opcode.STORE))
#: Field names of each opcode in the order its Stream method builds them.
_ORDER: dict[int, tuple[str, ...]] = {}
for _op, _names in ((Opcode.LOAD, ("dram_addr", "dram_stride_outer", "dram_stride_inner", "dst",
                                   "dst_stride_outer", "n_inner", "n_outer", "row_bytes", "mem",
                                   "fill", "fill_value")),
                    (Opcode.GATHER, ("dram_addr", "index_addr", "row_stride", "dst", "n",
                                     "row_bytes", "mem")),
                    (Opcode.PRELOAD, ("spad_addr",)),
                    (Opcode.MATMUL, ("spad_addr", "spad_stride_outer", "spad_stride_inner",
                                     "acc_addr", "n_inner", "n_outer", "accumulate", "swap")),
                    (Opcode.VECTOR, ("acc_addr", "spad_addr", "param_addr", "n", "zero_point",
                                     "clamp_min", "clamp_max", "fp32")),
                    (Opcode.ELTWISE, ("func", "a_addr", "b_addr", "shift", "dst",
                                      "a_stride_outer", "b_stride_outer", "n_inner",
                                      "a_stride_inner", "b_stride_inner", "a_mult", "b_mult",
                                      "n_outer", "a_zero", "b_zero", "zero_point", "clamp_min",
                                      "clamp_max")),
                    (Opcode.STORE, ("dram_addr", "dram_stride_outer", "dram_stride_inner", "src",
                                    "src_stride_outer", "n_inner", "n_outer", "row_bytes", "mem"))):
    # The instruction methods build their field tuples in this order (encode() places each
    # field by name, so the ISA may reorder them); fail at import if a field is added/removed.
    assert set(_BODY[_op]) == set(_names), (_op, _BODY[_op])
    _ORDER[int(_op)] = _names
    assert OPCODE_ENGINE[_op] is not None
