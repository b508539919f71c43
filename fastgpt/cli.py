"""The ``fastgpt`` command: ``fastgpt bench`` (more subcommands arrive with the model)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fastgpt bench [--full] [--ops OP ...] [--plot PNG]")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from fastgpt import bench

        return bench.main(rest)
    print(f"fastgpt: unknown command {command!r}", file=sys.stderr)
    return 2
