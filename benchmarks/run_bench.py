"""Thin wrapper: `python benchmarks/run_bench.py [ARGS]` is `mp-executors bench [ARGS]`.

The suite itself lives in the package (`mp_executors/benchmarking/suite.py`) so that the
command works from an install; see its docstring for what is measured.
"""

import sys

from mp_executors import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
