"""The compiler's one user-facing exception."""

from __future__ import annotations

__all__ = ["CompileError"]


class CompileError(ValueError):
    """A model the compiler cannot take: malformed, unsupported, or not static.

    The message names the node (``node``) and its operator (``op``) when there is one, so the
    user knows what to change.
    """

    def __init__(self, message: str, node: str | None = None, op: str | None = None) -> None:
        self.node = node
        self.op = op
        where = ""
        if node is not None or op is not None:
            where = f"node {node!r} ({op}): " if node is not None else f"{op}: "
        super().__init__(where + message)
