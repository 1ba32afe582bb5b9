"""npu: an open NPU stack — one ISA, a cycle-exact simulator, RTL and an ONNX compiler.

Layers (see docs/architecture.md): ``npu.isa`` and ``npu.program`` at the bottom; ``npu.runtime``,
``npu.hw`` and ``npu.compiler`` above them; ``npu.models`` and the CLI on top.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import npu` stays light; the session pulls in the compiler and runtime on demand.
    if name == "InferenceSession":
        from npu.compiler.session import InferenceSession
        return InferenceSession
    raise AttributeError(f"module 'npu' has no attribute {name!r}")
