"""The instruction stream: instructions in program order, tokens derived from memory footprints.

The emitters append instructions without any token: the *program order* defines what the
program means, as if one instruction ran after the other. :class:`Stream` records, for each
instruction, the SPAD/ACC rows and DRAM bytes it reads and writes, and finds its hazards
against earlier instructions of *other* engines (same-engine order is kept by the machine:
in-order start, ELTWISE waits for the previous VX result):

* read after write (RAW) on the last writer of every row read,
* write after read (WAR) on the last readers, and write after write (WAW) on the last writer.

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

from collections.abc import Iterable

import numpy as np

from npu.compiler.errors import CompileError
from npu.isa import INSTR_WORDS, LAYOUTS, OPCODE_ENGINE, Engine, NPUConfig, Opcode

__all__ = ["Stream"]

_N_ENG = len(Engine)
LD, EX, VX, ST = (int(e) for e in (Engine.LD, Engine.EX, Engine.VX, Engine.ST))


class _Space:
    """Last writer (per engine) and last readers (per engine) of every row/byte block."""

    def __init__(self, size: int, writers: Iterable[int], readers: Iterable[int],
                 block: int = 1) -> None:
        self.block = block
        n = -(-size // block) + 1
        self.writers = {e: np.full(n, -1, dtype=np.int64) for e in writers}
        self.readers = {e: np.full(n, -1, dtype=np.int64) for e in readers}

    def _span(self, lo: int, hi: int) -> slice:
        return slice(lo // self.block, -(-hi // self.block))

    def read(self, lo: int, hi: int, eng: int, idx: int, deps: list[int]) -> None:
        sl = self._span(lo, hi)
        for e, arr in self.writers.items():
            if e != eng:
                m = int(arr[sl].max())
                if m > deps[e]:
                    deps[e] = m
        self.readers[eng][sl] = idx

    def write(self, lo: int, hi: int, eng: int, idx: int, deps: list[int]) -> None:
        sl = self._span(lo, hi)
        for e, arr in self.writers.items():
            if e != eng:
                m = int(arr[sl].max())
                if m > deps[e]:
                    deps[e] = m
                arr[sl] = -1
        for e, arr in self.readers.items():
            if e != eng:
                m = int(arr[sl].max())
                if m > deps[e]:
                    deps[e] = m
            arr[sl] = -1
        self.writers[eng][sl] = idx


class Stream:
    """Instructions of one program, in order, with their cross-engine hazards."""

    def __init__(self, config: NPUConfig, dram_bytes: int, dram_block: int = 64) -> None:
        self.cfg = config
        self.opcodes: list[int] = []
        self.fields: list[dict[str, int]] = []
        self.engines: list[int] = []
        self.deps: list[list[int]] = []
        self.wait: list[int] = []
        self.signal: list[int] = []
        self.regions: list[tuple[int, str]] = []
        self.spad = _Space(config.spad_rows, (LD, VX), (EX, VX, ST))
        self.acc = _Space(config.acc_rows, (LD, EX), (EX, VX, ST))
        self.dram = _Space(max(dram_bytes, 1), (ST,), (LD,), block=dram_block)
        self._barrier_at: list[int] = []

    def __len__(self) -> int:
        return len(self.opcodes)

    def region(self, label: str) -> None:
        """Label the instructions emitted from now on (a layer name, for the profile)."""
        idx = len(self.opcodes)
        if self.regions and self.regions[-1][0] == idx:
            self.regions[-1] = (idx, label)
        else:
            self.regions.append((idx, label))

    def _add(self, op: Opcode, eng: int, fields: dict[str, int]) -> tuple[int, list[int]]:
        idx = len(self.opcodes)
        self.opcodes.append(int(op))
        self.fields.append(fields)
        self.engines.append(eng)
        deps = [-1] * _N_ENG
        self.deps.append(deps)
        return idx, deps

    # Instructions -------------------------------------------------------------------------
    def load(self, *, dst: int, n_inner: int, row_bytes: int, dram_addr: int = 0,
             dram_stride_inner: int = 0, n_outer: int = 1, dram_stride_outer: int = 0,
             dst_stride_outer: int = 0, mem: int = 0, fill: int = 0, fill_value: int = 0) -> int:
        """LOAD (DRAM or fill -> SPAD/ACC rows)."""
        f = dict(dram_addr=dram_addr, dram_stride_outer=dram_stride_outer,
                 dram_stride_inner=dram_stride_inner, dst=dst, dst_stride_outer=dst_stride_outer,
                 n_inner=n_inner, n_outer=n_outer, row_bytes=row_bytes, mem=mem, fill=fill,
                 fill_value=fill_value)
        idx, deps = self._add(Opcode.LOAD, LD, f)
        if not fill:
            end = dram_addr + (n_outer - 1) * dram_stride_outer + \
                (n_inner - 1) * dram_stride_inner + row_bytes
            self.dram.read(dram_addr, end, LD, idx, deps)
        space = self.acc if mem else self.spad
        space.write(dst, dst + (n_outer - 1) * dst_stride_outer + n_inner, LD, idx, deps)
        return idx

    def gather(self, *, dram_addr: int, index_addr: int, row_stride: int, dst: int, n: int,
               row_bytes: int, table_bytes: int, mem: int = 0) -> int:
        """GATHER (table rows by an int32 index list -> SPAD/ACC rows)."""
        f = dict(dram_addr=dram_addr, index_addr=index_addr, row_stride=row_stride, dst=dst,
                 n=n, row_bytes=row_bytes, mem=mem)
        idx, deps = self._add(Opcode.GATHER, LD, f)
        self.dram.read(index_addr, index_addr + 4 * n, LD, idx, deps)
        self.dram.read(dram_addr, dram_addr + table_bytes, LD, idx, deps)
        (self.acc if mem else self.spad).write(dst, dst + n, LD, idx, deps)
        return idx

    def preload(self, spad_addr: int) -> int:
        """PRELOAD (SPAD weight tile -> shadow bank)."""
        idx, deps = self._add(Opcode.PRELOAD, EX, {"spad_addr": spad_addr})
        self.spad.read(spad_addr, spad_addr + self.cfg.rows, EX, idx, deps)
        return idx

    def matmul(self, *, spad_addr: int, acc_addr: int, n_inner: int, n_outer: int = 1,
               spad_stride_inner: int = 1, spad_stride_outer: int = 0, accumulate: int = 0,
               swap: int = 0) -> int:
        """MATMUL (SPAD rows through the array -> ACC rows)."""
        f = dict(spad_addr=spad_addr, spad_stride_outer=spad_stride_outer,
                 spad_stride_inner=spad_stride_inner, acc_addr=acc_addr, n_inner=n_inner,
                 n_outer=n_outer, accumulate=accumulate, swap=swap)
        idx, deps = self._add(Opcode.MATMUL, EX, f)
        last = spad_addr + (n_outer - 1) * spad_stride_outer + (n_inner - 1) * spad_stride_inner
        self.spad.read(spad_addr, last + 1, EX, idx, deps)
        self.acc.write(acc_addr, acc_addr + n_inner * n_outer, EX, idx, deps)
        return idx

    def vector(self, *, acc_addr: int, spad_addr: int, param_addr: int, n: int,
               zero_point: int, clamp_min: int = -128, clamp_max: int = 127) -> int:
        """VECTOR (ACC rows -> requantized SPAD rows)."""
        f = dict(acc_addr=acc_addr, spad_addr=spad_addr, param_addr=param_addr, n=n,
                 zero_point=zero_point, clamp_min=clamp_min, clamp_max=clamp_max)
        idx, deps = self._add(Opcode.VECTOR, VX, f)
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
        f = dict(func=func, a_addr=a_addr, b_addr=b_addr, shift=shift, dst=dst,
                 a_stride_outer=a_stride_outer, b_stride_outer=b_stride_outer, n_inner=n_inner,
                 a_stride_inner=a_stride_inner, b_stride_inner=b_stride_inner, a_mult=a_mult,
                 b_mult=b_mult, n_outer=n_outer, a_zero=a_zero, b_zero=b_zero,
                 zero_point=zero_point, clamp_min=clamp_min, clamp_max=clamp_max)
        idx, deps = self._add(Opcode.ELTWISE, VX, f)
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
        f = dict(dram_addr=dram_addr, dram_stride_outer=dram_stride_outer,
                 dram_stride_inner=dram_stride_inner, src=src, src_stride_outer=src_stride_outer,
                 n_inner=n_inner, n_outer=n_outer, row_bytes=row_bytes, mem=mem)
        idx, deps = self._add(Opcode.STORE, ST, f)
        (self.acc if mem else self.spad).read(src, src + (n_outer - 1) * src_stride_outer
                                              + n_inner, ST, idx, deps)
        end = dram_addr + (n_outer - 1) * dram_stride_outer + \
            (n_inner - 1) * dram_stride_inner + row_bytes
        self.dram.write(dram_addr, end, ST, idx, deps)
        return idx

    def barrier(self) -> int:
        """BARRIER: everything before retires before anything after is dispatched."""
        idx, _ = self._add(Opcode.BARRIER, -1, {})
        self._barrier_at.append(idx)
        return idx

    def halt(self) -> int:
        idx, _ = self._add(Opcode.HALT, -1, {})
        return idx

    # Tokens ------------------------------------------------------------------------------
    def assign_tokens(self) -> dict[str, int]:
        """Turn hazards into wait/signal masks (see the module doc). Returns token statistics."""
        n = len(self.opcodes)
        wait = [0] * n
        signal = [0] * n
        # known[i]: per engine, the latest instruction known retired when i starts.
        known: list[tuple[int, ...]] = [()] * n
        state = [[-1] * _N_ENG for _ in range(_N_ENG)]   # frontier of each engine's last start
        last_idx = [-1] * _N_ENG
        # Outstanding-token bound per (src, dst): signal and wait positions.
        sig_pos: dict[tuple[int, int], list[int]] = {}
        wait_pos: dict[tuple[int, int], list[int]] = {}
        waits = 0
        for i in range(n):
            e = self.engines[i]
            if e < 0:
                if self.opcodes[i] == int(Opcode.BARRIER):
                    full = [max(last_idx[k], state[k][k]) for k in range(_N_ENG)]
                    for k in range(_N_ENG):
                        state[k] = [max(a, b) for a, b in zip(state[k], full)]
                continue
            k_now = list(state[e])
            for src, p in enumerate(self.deps[i]):
                if src == e or p < 0 or p <= k_now[src]:
                    continue
                # p has not signalled e before: an earlier wait on it would cover it.
                signal[p] |= 1 << e
                wait[i] |= 1 << src
                waits += 1
                kp = known[p]
                for k in range(_N_ENG):
                    if kp[k] > k_now[k]:
                        k_now[k] = kp[k]
                k_now[src] = max(k_now[src], p)
                sig_pos.setdefault((src, e), []).append(p)
                wait_pos.setdefault((src, e), []).append(i)
            k_now[e] = max(k_now[e], -1)
            known[i] = tuple(k_now)
            state[e] = k_now
            last_idx[e] = i
        self.wait, self.signal = wait, signal
        worst = self._check_outstanding(known, sig_pos, wait_pos)
        return {"waits": waits, "max_outstanding": worst}

    def _check_outstanding(self, known: list[tuple[int, ...]],
                           sig_pos: dict[tuple[int, int], list[int]],
                           wait_pos: dict[tuple[int, int], list[int]]) -> int:
        """Bound the tokens pending on each counter: when the k-th signal of src->dst retires,
        at least the waits of dst up to what the signaller knows of dst have been consumed."""
        worst = 0
        for (src, dst), sigs in sig_pos.items():
            waits = np.array(wait_pos[(src, dst)], dtype=np.int64)
            for k, p in enumerate(sigs):
                seen = known[p][dst]
                consumed = int(np.searchsorted(waits, seen, side="right"))
                pending = k + 1 - consumed
                worst = max(worst, pending)
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
            body = [k for k in layout if k not in cols]
            if body:
                mat = np.array([[self.fields[i].get(k, 0) for k in body] for i in sel],
                               dtype=np.int64).reshape(len(sel), len(body))
                for j, k in enumerate(body):
                    cols[k] = mat[:, j]
            if opc == Opcode.SYNC:
                cols["engine"] = np.array([self.engines[i] for i in sel], dtype=np.int64)
            part = np.zeros((len(sel), INSTR_WORDS), dtype=np.uint64)
            for key, f in layout.items():
                v = cols[key]
                bad = (v < f.lo) | (v > f.hi)
                if bad.any():
                    at = int(sel[np.flatnonzero(bad)[0]])
                    raise CompileError(f"internal: instruction {at} ({opc.name}) field {key}="
                                       f"{int(v[np.flatnonzero(bad)[0]])} is out of range "
                                       f"[{f.lo}, {f.hi}]")
                raw = (v & ((1 << f.width) - 1)).astype(np.uint64)
                part[:, f.lsb // 64] |= raw << np.uint64(f.lsb % 64)
            words[sel] = part
        return words

    def engine_counts(self) -> dict[str, int]:
        """Instructions per opcode name (for reports)."""
        counts: dict[str, int] = {}
        for op in self.opcodes:
            name = Opcode(op).name
            counts[name] = counts.get(name, 0) + 1
        return counts


assert OPCODE_ENGINE[Opcode.MATMUL] == Engine.EX  # the tracker's engine sets assume the ISA's
