"""Ours vs Flower's simulation engine on the FedAvg workload, in one run (one machine state).

    bash benchmarks/peers/setup_flower_venv.sh         # once: flwr[simulation] in its own venv
    python benchmarks/flower_vs_mp.py [--clients 100,1000] [--rounds 4] [--out benchmarks/results/flower_vs_mp]

The FedAvg part of `mp-executors bench` (`mp_executors.benchmarking.suite`: floor, local, mp with
data passed, mp with data resident, auto-sized: 2 workers on 2 cores) at the given client counts,
then Flower (`mp_executors.benchmarking.flower_peer`, after our pool is closed), with the same
tables (bench.md: FedAvg rounds, memory, ours / Flower) and bench.json. The full suite
(`mp-executors bench`) measures the same Flower rows among all the others; this is the quick way
to re-measure just the comparison (~3 min on 2 cores). The load average (1 min) is recorded
before each part: the machine may be shared, and the ratios are between numbers of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mp_executors.benchmarking import flower_peer
from mp_executors.benchmarking import suite as bench


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 100,1000, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=_ints, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per point, the first is warm-up (default 4)")
    parser.add_argument("--flower-venv", type=Path, default=flower_peer.DEFAULT_FLOWER_VENV)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/flower_vs_mp"))
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the first is warm-up), got {args.rounds}")
    if not flower_peer.flower_clients(args.clients):
        parser.error(f"--clients: Flower runs at {flower_peer.MIN_CLIENTS:,}..{flower_peer.MAX_CLIENTS:,} clients, "
                     f"got {args.clients}")
    if not (args.flower_venv / "bin" / "python").exists():
        parser.error(f"no Flower venv at {args.flower_venv}: bash benchmarks/peers/setup_flower_venv.sh")
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = bench.SuiteConfig(args.clients, [], [], 0, args.rounds, main_clients=[], small_clients=[],
                            coldstart_runs=0, name="flower_vs_mp")
    started = time.perf_counter()
    load = {"before_ours": os.getloadavg()[0]}
    suite = bench.Suite(cfg, lambda line: print(line, flush=True))
    try:
        suite.fedavg()
    finally:
        suite.close()
    load["before_flower"] = os.getloadavg()[0]
    rows, versions, notes = flower_peer.measure(args.flower_venv, args.clients, args.rounds, args.out,
                                                lambda line: print(line, flush=True))
    load["after"] = os.getloadavg()[0]
    suite.rows += rows
    cfg.notes += notes
    cfg.notes.append("load average (1 min) before ours {before_ours:.2f}, before Flower {before_flower:.2f}, "
                     "after {after:.2f} (2 cores, shared)".format(**load))
    command = " ".join(["python benchmarks/flower_vs_mp.py", *(sys.argv[1:] if argv is None else argv)])
    doc = {"suite": cfg.name, "command": command, "when": time.strftime("%Y-%m-%d %H:%M"),
           "machine": bench.machine(), "load_average": load,
           "config": {"rounds": args.rounds, "big_rounds": cfg.big_rounds, "big_threshold": cfg.big_threshold,
                      "fedavg_clients": args.clients},
           "rows": suite.rows, "ratios": bench.ratios(suite.rows), "notes": cfg.notes, "flower_versions": versions,
           "duration_s": time.perf_counter() - started}
    (args.out / "bench.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    (args.out / "bench.md").write_text(bench.markdown(doc))
    print()
    print((args.out / "bench.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
