"""Measures the worker pool against its targets, in one run (one machine state).

    python benchmarks/pool_targets.py [--rounds 6] [--out benchmarks/results/pool_targets.json]

Workloads are those of FACTS.md (`mp_executors.benchmarking.workloads`), measured
with the helpers `mp-executors bench` uses (`mp_executors.benchmarking.suite`). Every number
is the median of rounds 2..R of one configuration (round 1 is the warm-up:
pool start, graph import, tracing), with min and max; ratios are between
numbers of this same run. Prints a markdown table and writes a JSON file
with every sample and a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psutil

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.benchmarking import workloads as W
from mp_executors.benchmarking.suite import machine, measure


def worker_memory(factory) -> dict:
    rss = pss = 0
    for pid in factory.pool.pids():
        try:
            info = psutil.Process(pid).memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.uss)
    return {"rss": rss, "pss": pss}


def floor(clients: list[dict], rounds: int) -> dict:
    run = W.floor_round_fn()
    xs = tf.constant(np.stack([c["x"] for c in clients]))
    ys = tf.constant(np.stack([c["y"] for c in clients]))
    model = W.initial_model()
    return measure(lambda: [t.numpy() for t in run(model["w"], model["b"], xs, ys)], rounds)


def fedavg(factory, data, rounds: int, memory: dict | None = None) -> dict:
    state = {"model": W.initial_model()}

    def one_round():
        state["model"] = W.fedavg_round(state["model"], data)
        if memory is not None and hasattr(factory, "pool"):
            sample = worker_memory(factory)
            memory["rss"] = max(memory.get("rss", 0), sample["rss"])
            memory["pss"] = max(memory.get("pss", 0), sample["pss"])

    with mpx.execution_context(factory):
        return measure(one_round, rounds)


def overhead(factory, n: int, rounds: int) -> dict:
    values = list(np.random.default_rng(0).random(n, dtype=np.float32))
    with mpx.execution_context(factory):
        return measure(lambda: W.overhead_sum(values), rounds)


def warm_call_check(factory, data) -> dict:
    """A warm second call: same worker pids, no new process, no module imported."""
    with mpx.execution_context(factory):
        W.fedavg_round(W.initial_model(), data)
        pids = sorted(factory.pool.pids())
        children = {p.pid for p in psutil.Process().children(recursive=True)}
        modules = [r["modules"] for r in factory.pool.reports()]
        W.fedavg_round(W.initial_model(), data)
        after_children = {p.pid for p in psutil.Process().children(recursive=True)}
        return {
            "same_worker_pids": pids == sorted(factory.pool.pids()),
            "new_processes": len(after_children - children),
            "new_modules": [b - a for a, b in zip(modules, [r["modules"] for r in factory.pool.reports()])],
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--overhead-clients", type=int, default=10_000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pool_targets.json"))
    args = parser.parse_args(argv)
    n, rounds = args.clients, args.rounds
    results: dict = {
        "command": "python benchmarks/pool_targets.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"building {n} clients of FedAvg data ...", flush=True)
    clients = W.make_clients(n)

    print("floor (one process, one graph over all clients) ...", flush=True)
    results["floor_1000"] = floor(clients, rounds)

    mp2 = mpx.mp_executor_factory(num_workers=2)
    try:
        resident = mpx.ClientData(W.make_client, list(range(n)), W.DATA_TYPE)
        memory: dict = {}
        print("mp, 2 workers, client data resident (ClientData) ...", flush=True)
        results["mp2_resident_1000"] = fedavg(mp2, resident, rounds, memory)
        results["mp2_memory_1000"] = memory
        print("mp, 2 workers, client data passed as numpy each round ...", flush=True)
        results["mp2_passed_1000"] = fedavg(mp2, clients, rounds)
        print("warm second call ...", flush=True)
        results["warm_call"] = warm_call_check(mp2, clients[:100])
        print("FedAvg at 100 clients, mp (2 workers) ...", flush=True)
        results["mp2_passed_100"] = fedavg(mp2, clients[:100], rounds)
    finally:
        mp2.close()
    local = mpx.local_executor_factory()
    try:
        print("FedAvg at 100 clients, local ...", flush=True)
        results["local_passed_100"] = fedavg(local, clients[:100], rounds)
    finally:
        local.close()
    auto = mpx.mp_executor_factory()
    try:
        print(f"federated_sum over {args.overhead_clients} clients, mp (auto) ...", flush=True)
        results["mp_auto_sum"] = overhead(auto, args.overhead_clients, rounds)
    finally:
        auto.close()

    m = lambda key: results[key]["median"]  # noqa: E731
    rows = [
        ("FedAvg 1000, resident, mp-2 / (floor/2)", m("mp2_resident_1000") / (m("floor_1000") / 2), "<= 1.5"),
        ("FedAvg 1000, passed each round, mp-2 (s)", m("mp2_passed_1000"), "<= 1.14 (0.2 x peer 5.7 s)"),
        ("FedAvg 100, mp-2 / local", m("mp2_passed_100") / m("local_passed_100"), "<= 0.6"),
        (f"federated_sum {args.overhead_clients}, us per client", m("mp_auto_sum") / args.overhead_clients * 1e6, "<= 30"),
        ("workers' memory during FedAvg 1000, GB (PSS; RSS)",
         f"{results['mp2_memory_1000']['pss'] / 1e9:.2f}; {results['mp2_memory_1000']['rss'] / 1e9:.2f}", "<= 1.5"),
        ("warm call: same pids, new processes, new modules per worker",
         f"{results['warm_call']['same_worker_pids']}, {results['warm_call']['new_processes']}, "
         f"{results['warm_call']['new_modules']}", "True, 0, 0"),
    ]
    results["table"] = [{"metric": a, "value": b, "target": c} for a, b, c in rows]
    print()
    print("| metric | measured | target |")
    print("|---|---|---|")
    for name, value, target in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"| {name} | {shown} | {target} |")
    print()
    for key in ("floor_1000", "mp2_resident_1000", "mp2_passed_1000", "mp2_passed_100", "local_passed_100", "mp_auto_sum"):
        r = results[key]
        print(f"{key:22s} median {r['median']:.4f} s  (min {r['min']:.4f}, max {r['max']:.4f})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=float)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
