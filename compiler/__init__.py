"""npu.compiler: ONNX models to quantized, tiled, scheduled NPU programs.

Entry points: :func:`npu.compiler.pipeline.compile_model` (ONNX -> :class:`CompiledModel`),
:class:`npu.compiler.session.InferenceSession` (also ``npu.InferenceSession``),
:mod:`npu.compiler.bundle` (``.npub`` files), :mod:`npu.compiler.cli` (``npu compile``) and
:class:`npu.compiler.backend.NpuBackend` (the ``onnx.backend`` API). ``docs/compiler.md``
describes the passes.
"""

from npu.compiler.errors import CompileError

__all__ = ["CompileError"]
