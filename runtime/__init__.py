"""npu.runtime: execute NPU programs bit-exactly and cycle-accurately, and profile them."""

from npu.runtime.result import NPUFault, RunResult, Stall, Trace

__all__ = ["NPUFault", "RunResult", "Stall", "Trace"]
