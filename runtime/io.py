"""Input and output plumbing shared by both executors.

:func:`initial_state` builds the three memories a run starts from: DRAM with the program's
segments and the caller's input tensors written at their bindings, and zeroed SPAD and ACC.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from npu.program import Binding, Program

__all__ = ["initial_state", "encode_input"]


def encode_input(binding: Binding, value: object) -> bytes:
    """The little-endian bytes of ``value`` as ``binding`` declares it.

    Raises ValueError (naming the input) on a wrong shape, a non-numeric array, a non-integral
    value for an integer binding, or a value outside the binding's dtype range.
    """
    where = f"input {binding.name!r}"
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: expected a numeric array, got dtype {arr.dtype}")
    if tuple(arr.shape) != tuple(binding.shape):
        raise ValueError(f"{where}: shape {tuple(arr.shape)} does not match the binding's "
                         f"shape {tuple(binding.shape)}")
    target = np.dtype(binding.dtype)
    if target.kind in "iu":
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(f"{where}: {binding.dtype} input holds non-integral or "
                                 f"non-finite values")
        if arr.size:
            info = np.iinfo(target)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"{where}: values [{lo}, {hi}] are outside the {binding.dtype} "
                                 f"range [{info.min}, {info.max}]")
    return np.ascontiguousarray(arr.astype(target.newbyteorder("<"))).tobytes()


def _covered_by_segments(program: Program, start: int, end: int) -> bool:
    """True when every byte of DRAM [start, end) lies in some segment of the program."""
    covered = np.zeros(end - start, dtype=bool)
    for seg in program.segments:
        lo, hi = max(seg.addr, start), min(seg.end, end)
        if lo < hi:
            covered[lo - start:hi - start] = True
    return bool(covered.all())


def initial_state(program: Program, inputs: Mapping[str, object] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The memories a run starts from: ``(dram uint8 [dram_bytes], spad int8 [spad_rows, cols],
    acc int32 [acc_rows, cols])``.

    DRAM holds the program's segments, then each input of ``inputs`` (name -> array) written at
    its binding in the binding's dtype. Every input binding must be given unless segments
    already initialise all of its bytes; unknown names are an error. SPAD and ACC start at zero.
    """
    cfg = program.config
    inputs = dict(inputs or {})
    by_name = {b.name: b for b in program.inputs}
    unknown = sorted(set(inputs) - set(by_name))
    if unknown:
        raise ValueError(f"unknown input(s) {unknown}; the program's inputs are "
                         f"{sorted(by_name)}")
    dram = program.initial_dram()
    for name, binding in by_name.items():
        if name not in inputs:
            if _covered_by_segments(program, binding.addr, binding.addr + binding.nbytes):
                continue
            raise ValueError(f"input {name!r} (shape {tuple(binding.shape)}, {binding.dtype}) "
                             f"was not given")
        raw = encode_input(binding, inputs[name])
        if binding.addr < 0 or binding.addr + len(raw) > len(dram):
            raise ValueError(f"input {name!r}: binding [{binding.addr}, "
                             f"{binding.addr + len(raw)}) lies outside DRAM of {len(dram)} bytes")
        dram[binding.addr:binding.addr + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    spad = np.zeros((cfg.spad_rows, cfg.cols), dtype=np.int8)
    acc = np.zeros((cfg.acc_rows, cfg.cols), dtype="<i4")
    return dram, spad, acc
