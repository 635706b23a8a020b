"""Measures the worker pool against its targets, in one run (one machine state).

    python benchmarks/pool_targets.py [--rounds 6] [--out benchmarks/results/pool_targets.json]
    python benchmarks/pool_targets.py --cold-only      # only the cold-start targets (~5 min;
                                                       # benchmarks/results/pool_targets_cold.json)

Cold start (each sample a fresh process, `mp_executors.benchmarking.coldstart`): a
2-worker pool ready after the parent's TensorFlow import (fork server vs
start_method='loky'), and the default `mp-executors run` wall time, process start
to exit, on mp and on local (runs interleaved, `--run-repeats` each; the load
average is recorded with them: the machine may be shared).

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.benchmarking import coldstart
from mp_executors.benchmarking import workloads as W
from mp_executors.benchmarking.suite import COLDSTART_RUNTIMES, machine, measure


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


def pool_ready(runs: int) -> dict:
    """End of the parent's TensorFlow import -> 2 workers ready, fork server vs loky, `runs` processes each."""
    out = {}
    for method in ("forkserver", "loky"):
        samples = []
        for _ in range(runs):
            proc = subprocess.run([sys.executable, "-m", "mp_executors.benchmarking.coldstart", "--pool-ready",
                                   "--workers", "2", "--start-method", method],
                                  capture_output=True, text=True, timeout=600, check=True)
            samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        ready = [r["pool_ready_after_tf_import_s"] for r in samples]
        out[method] = {"median": statistics.median(ready), "min": min(ready), "max": max(ready), "runs": samples}
    return out


def default_run_wall(repeats: int) -> dict:
    """`mp-executors run` with its defaults, process start -> exit, mp and local interleaved."""
    exe = shutil.which("mp-executors")
    base = [exe] if exe else [sys.executable, "-m", "mp_executors.cli"]
    walls: dict[str, list[float]] = {"mp": [], "local": []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for executor in ("local", "mp"):
                loads.append(os.getloadavg()[0])
                start = time.perf_counter()
                subprocess.run([*base, "run", "--executor", executor, "--out", f"{tmp}/{executor}{i}", "-q"],
                               capture_output=True, text=True, timeout=900, check=True)
                walls[executor].append(time.perf_counter() - start)
    out = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v} for k, v in walls.items()}
    out["load_average_1min"] = loads
    return out


def cold_rows(results: dict) -> list[tuple]:
    pr, run, first = results["pool_ready"], results["default_run"], results["first_result"]
    return [
        *((f"factory creation -> first result, 100 clients, {rt} (s)", first[rt]["median"], "")
          for rt in first),
        ("2-worker pool ready after the parent's TF import, fork server (s)", pr["forkserver"]["median"], "<= 2"),
        ("2-worker pool ready after the parent's TF import, start_method='loky' (s)", pr["loky"]["median"],
         "(the former default)"),
        ("default `mp-executors run` wall, mp (s)", run["mp"]["median"], ""),
        ("default `mp-executors run` wall, local (s)", run["local"]["median"], ""),
        ("default `mp-executors run` wall, mp / local", run["mp"]["median"] / run["local"]["median"], "<= 1.0"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--overhead-clients", type=int, default=10_000)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/pool_targets.json "
                        "(pool_targets_cold.json with --cold-only)")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per pool-ready sample")
    parser.add_argument("--run-repeats", type=int, default=3, help="default `mp-executors run`s per executor")
    parser.add_argument("--cold-only", action="store_true", help="measure only the cold-start targets")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "pool_targets_cold.json" if args.cold_only else "pool_targets.json"
        args.out = str(Path(__file__).resolve().parent / "results" / name)
    n, rounds = args.clients, args.rounds
    results: dict = {
        "command": "python benchmarks/pool_targets.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print("cold start: 2-worker pool ready after the parent's TensorFlow import ...", flush=True)
    results["pool_ready"] = pool_ready(args.cold_runs)
    print("cold start: factory creation -> first result (100 clients), local / mp / mp with loky ...", flush=True)
    results["first_result"] = {rt: coldstart.measure(executor, method, clients=100, runs=args.cold_runs)
                               for rt, executor, method in COLDSTART_RUNTIMES}
    print("cold start: the default `mp-executors run`, mp and local interleaved ...", flush=True)
    results["default_run"] = default_run_wall(args.run_repeats)
    if args.cold_only:
        return _report(results, cold_rows(results), args.out, [])
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
    rows += cold_rows(results)
    keys = ("floor_1000", "mp2_resident_1000", "mp2_passed_1000", "mp2_passed_100", "local_passed_100", "mp_auto_sum")
    return _report(results, rows, args.out, keys)


def _report(results: dict, rows: list[tuple], out: str, keys) -> int:
    results["table"] = [{"metric": a, "value": b, "target": c} for a, b, c in rows]
    print()
    print("| metric | measured | target |")
    print("|---|---|---|")
    for name, value, target in rows:
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"| {name} | {shown} | {target} |")
    print()
    for key in keys:
        r = results[key]
        print(f"{key:22s} median {r['median']:.4f} s  (min {r['min']:.4f}, max {r['max']:.4f})")
    loads = results["default_run"]["load_average_1min"]
    print(f"1-minute load average during the default runs: {min(loads):.1f} .. {max(loads):.1f} "
          f"on {results['machine']['cpus']} CPUs")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=float)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
