"""The ``npu`` command line: one entry point, one subcommand per job.

Each layer contributes its subcommands through an ``add_parser(subparsers)`` function listed in
:data:`PLUGINS`, so this module stays at the top of the import graph and every subcommand
imports its heavy dependencies (numba, onnx, amaranth) only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules providing ``add_parser(subparsers)``, in the order their commands are listed.
PLUGINS: tuple[str, ...] = (
    "npu.tools",            # info, isa, asm, disasm
    "npu.runtime.cli",      # run, profile (program files)
    "npu.compiler.cli",     # compile, profile of ONNX models
    "npu.hw.cli",           # rtl
    "npu.verify",           # verify, conformance (RTL vs runtime)
    "npu.models.cli",       # demo
)


class CLIError(Exception):
    """A user error: printed as ``npu: error: ...`` with exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npu",
        description="An open NPU stack: compile ONNX models, run them on a cycle-exact "
                    "simulator, profile them, and check the RTL against it.",
        epilog="Run `npu <command> --help` for the options of each command.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A layer that is not installed (e.g. hw without amaranth) just adds no command.
            if exc.name and (name.startswith(exc.name) or exc.name in ("amaranth", "numba")):
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except CLIError as exc:
        print(f"npu: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npu: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # known user-facing errors of the layers
        known = ("ProgramError", "ISAError", "NPUFault", "CompileError", "ModelError")
        if type(exc).__name__ in known or any(c.__name__ in known for c in type(exc).__mro__):
            print(f"npu: error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
