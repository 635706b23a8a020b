"""The bench's small-model rows alone: the one-graph floor, local and mp, and their ratios.

    python benchmarks/small_model_ratios.py [CLIENTS] [ROUNDS] [floor,local,mp]

Runs each runtime twice, alternating (floor, local, mp, floor, ...), on the same resident
`ClientData` (benchmarking/workloads.py "small": the main job's shape) and prints each
median and the best median of each runtime divided by the floor's. A quick check of the
issue-11 targets (local <= 1.5x, mp with 2 workers <= 1.0x at 1,000 clients) without the
whole `mp-executors bench`; on a shared machine, repeat it and compare ratios.
"""

from __future__ import annotations

import sys

import mp_executors as mpx
from mp_executors.benchmarking import suite, workloads


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 1000
    rounds = int(argv[1]) if len(argv) > 1 else 8
    which = argv[2].split(",") if len(argv) > 2 else ["floor", "local", "mp"]
    resident = mpx.ClientData(workloads.make_small_client, list(range(n)), workloads.SMALL_DATA_TYPE)
    medians: dict[str, list[float]] = {}
    for rep in range(2):
        for runtime in which:
            if runtime == "floor":
                result = suite._small_floor(n, rounds)
            else:
                factory = mpx.local_executor_factory() if runtime == "local" else mpx.mp_executor_factory(num_workers=2)
                with factory:
                    result = suite._small_rounds(factory, resident, rounds)
            medians.setdefault(runtime, []).append(result["median"])
            print(f"{runtime:5s} run {rep + 1}: median {result['median'] * 1000:.1f} ms (min {result['min'] * 1000:.1f})",
                  flush=True)
    if "floor" in medians:
        floor = min(medians["floor"])
        for runtime, values in medians.items():
            print(f"{runtime:5s} {min(values) / floor:.2f}x the floor")


if __name__ == "__main__":
    main(sys.argv[1:])
