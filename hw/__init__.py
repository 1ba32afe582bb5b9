"""npu.hw: the NPU in Amaranth HDL (see docs/hardware.md).

``NPU(config)`` is the machine, ``NPUSimTop(config)`` adds a DRAM model and trace memories,
``run(...)`` executes a program inside Amaranth's simulator, ``verilog(config, top)`` exports
Verilog. Names are imported lazily so that ``npu --help`` does not load Amaranth.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NPU", "NPUSimTop", "run", "verilog", "stats"]

_WHERE = {"NPU": "npu", "NPUSimTop": "simtop", "run": "simtop", "verilog": "export",
          "stats": "export"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
