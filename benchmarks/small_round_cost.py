"""The small-model round on the worker pool against its one-graph floor, and what the pool costs besides compute.

    python benchmarks/small_round_cost.py [--clients 1000] [--rounds 40] [--workers 2]

The floor (`workloads.small_floor_round_fn`: one vectorized graph over all clients, in this
process) and `workloads.small_round` on an `mp_executor_factory(num_workers=...)` with the
clients resident (`ClientData`) run ALTERNATELY, round by round, in one process: on a machine
shared with other jobs, both see the same load, so their ratio means more than two separate
runs' would. Prints the medians and minimums, their ratio, and per mp round: the parent's CPU
time (all its threads), the workers' CPU time (summed), how many shard requests were sent and in
how many messages (`workers.pool.Outbox`). The load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import psutil

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.benchmarking import workloads as W


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _messages(pool) -> int:
    # Submissions to the workers (before `pool.Outbox`, each request was its own).
    return sum(slot.outbox.messages if hasattr(slot, "outbox") else 0 for slot in pool.slots) or pool.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    n = args.clients

    ids, xs, ys = W.stacked_small_clients(n)
    floor_round = W.small_floor_round_fn()
    resident = mpx.ClientData(W.make_small_client, list(range(n)), W.SMALL_DATA_TYPE)

    floor_model, mp_model = W.small_initial_model(), W.small_initial_model()
    floor_times, mp_times = [], []
    parent_cpu = 0.0
    with mpx.mp_executor_factory(num_workers=args.workers) as factory, mpx.execution_context(factory):
        pool = factory.pool
        for r in range(args.rounds + 2):  # rounds 0 and 1 warm up (pool start, conversion, tracing)
            if r == 2:
                pids = pool.pids()
                workers_cpu0 = _cpu_seconds(pids)
                requests0 = pool.requests
                messages0 = _messages(pool)
                load = os.getloadavg()[0]
            start = time.perf_counter()
            w, b = floor_round(floor_model["w"], floor_model["b"], tf.constant(r, tf.int32), ids, xs, ys)
            floor_model = {"w": w.numpy(), "b": b.numpy()}
            cpu_before = _cpu_seconds([os.getpid()])  # the floor's round is over: only mp's share counts
            middle = time.perf_counter()
            mp_model = W.small_round(mp_model, np.int32(r), resident)
            end = time.perf_counter()
            if r >= 2:
                floor_times.append(middle - start)
                mp_times.append(end - middle)
                parent_cpu += _cpu_seconds([os.getpid()]) - cpu_before
        workers_cpu = _cpu_seconds(pids) - workers_cpu0
        requests = (pool.requests - requests0) / args.rounds
        messages = (_messages(pool) - messages0) / args.rounds
    floor, mp = statistics.median(floor_times), statistics.median(mp_times)
    print(f"small model, {n} resident clients, {args.workers} workers, {args.rounds} rounds each, alternating "
          f"(load average {load:.1f} -> {os.getloadavg()[0]:.1f})")
    print(f"  floor {1000 * floor:.1f} ms (min {1000 * min(floor_times):.1f}); "
          f"mp {1000 * mp:.1f} ms (min {1000 * min(mp_times):.1f}); mp / floor {mp / floor:.2f}x "
          f"(of the minimums {min(mp_times) / min(floor_times):.2f}x)")
    print(f"  per mp round: {requests:.0f} shard requests in {messages:.0f} messages; CPU: the parent "
          f"{1000 * parent_cpu / args.rounds:.1f} ms (all its threads), the workers {1000 * workers_cpu / args.rounds:.1f} ms")


if __name__ == "__main__":
    main()
