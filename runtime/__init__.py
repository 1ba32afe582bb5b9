"""npu.runtime: execute NPU programs bit-exactly and cycle-accurately, and profile them.

``run(program, inputs, engine="numba"|"reference", ...)`` executes a program (see
:func:`npu.runtime.engine.run`); it is imported lazily so that ``import npu.runtime`` does not
pull in numba.
"""

from typing import Any

from npu.runtime.result import NPUFault, RunResult, Stall, Trace

__all__ = ["NPUFault", "RunResult", "Stall", "Trace", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from npu.runtime.engine import run
        return run
    raise AttributeError(f"module 'npu.runtime' has no attribute {name!r}")
