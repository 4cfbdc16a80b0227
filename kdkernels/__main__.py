"""`python -m kdkernels` / the `kdkernels` console script.

Commands:
    kdkernels bench [options]   benchmark suite (kdkernels bench --help)
    kdkernels --version
"""

from __future__ import annotations

import sys

USAGE = """usage: kdkernels <command> [options]

commands:
  bench      run the benchmark suite (kdkernels bench --help)

options:
  --version  print the version
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    if argv[0] == "bench":
        from .bench.cli import main as bench_main

        return bench_main(argv[1:])
    print(f"kdkernels: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
