"""Compiler passes: each a small function over the IR (see npu.compiler.pipeline)."""
