"""Cold start: how long a fresh process waits for its first result (the `coldstart` bench row).

    python -m mp_executors.benchmarking.coldstart [--executor mp|local] [--start-method M] [--clients N]

One measurement is one fresh interpreter (a cold start cannot be repeated in a
warm process) doing what a user's program does, in this order:

    import mp_executors; import TensorFlow (timed: the parent's own import)
    trace a computation (a tf_computation mapped over the clients, then federated_sum)
    create the factory                      <- t_factory
    call it on N clients                    <- t_result (the first result)

and printing one JSON line: `factory_to_first_result_s` (the bench row),
`after_tf_import_s` (first result minus the end of the parent's TensorFlow
import: the pool-start target), `tf_import_s`, `process_to_first_result_s`
(from the process's creation, interpreter start included) and, for `mp`, the
fork server's mode and the workers' start state.

`--pool-ready` times only the pool start instead: the end of the parent's
TensorFlow import -> a 2-worker pool whose workers have all answered.

`measure(...)` runs it `runs` times in subprocesses and summarizes the samples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import psutil

import mp_executors as mpx
from mp_executors.workers import fork_server

#: The interpreter's creation time, read first thing (before the imports below are timed).
_CREATED = psutil.Process().create_time()


def _run_once(executor: str, start_method: str | None, clients: int, num_workers: int | None) -> dict[str, Any]:
    """The measurement itself, in this (fresh) process."""
    tf_start = time.perf_counter()
    from mp_executors._tf import tf  # noqa: PLC0415 - the parent's own TensorFlow import is timed

    tf_end = time.perf_counter()

    @mpx.tf_computation(mpx.TensorType(np.float32))
    def add_one(x):
        return tf.add(x, 1.0)

    @mpx.federated_computation(mpx.FederatedType(mpx.TensorType(np.float32), mpx.CLIENTS))
    def total(xs):
        return mpx.federated_sum(mpx.federated_map(add_one, xs))

    values = [np.float32(i) for i in range(clients)]
    t_factory = time.perf_counter()
    if executor == "local":
        factory = mpx.local_executor_factory()
    else:
        factory = mpx.mp_executor_factory(num_workers=num_workers, start_method=start_method)
    with factory, mpx.execution_context(factory):
        result = total(values)
        t_result = time.perf_counter()
        wall_result = time.time()
        expected = float(np.sum(np.asarray(values, np.float64) + 1.0))
        if abs(float(result) - expected) > 1e-3 * max(1.0, expected):
            raise AssertionError(f"cold start computed {result}, expected {expected}")
        out: dict[str, Any] = {
            "executor": executor, "clients": clients,
            "tf_import_s": tf_end - tf_start,
            "factory_to_first_result_s": t_result - t_factory,
            "after_tf_import_s": t_result - tf_end,
            "process_to_first_result_s": wall_result - _CREATED,
        }
        pool = getattr(factory, "pool", None)
        if pool is not None:
            out["start_method"] = pool.start_method
            out["workers"] = pool.size
            out["server_mode"] = fork_server.server().mode if pool.start_method == "forkserver" else None
            out["worker_start"] = [r.get("start") for r in pool.reports()]
    return out


def _pool_ready(start_method: str | None, num_workers: int) -> dict[str, Any]:
    """The pool-start target: end of this process's TensorFlow import -> `num_workers` workers ready.

    Ready: each worker has started, pinned itself, applied its thread and GPU
    settings, created its Worker and answered a request (`pool.reports()`).
    """
    tf_start = time.perf_counter()
    from mp_executors._tf import tf  # noqa: PLC0415, F401 - the parent's own TensorFlow import is timed

    tf_end = time.perf_counter()
    with mpx.mp_executor_factory(num_workers=num_workers, start_method=start_method) as factory:
        factory.pool.fit(factory.plan(num_workers))
        reports = factory.pool.reports()
        ready = time.perf_counter()
        return {"executor": "mp", "start_method": factory.pool.start_method, "workers": len(reports),
                "tf_import_s": tf_end - tf_start, "pool_ready_after_tf_import_s": ready - tf_end,
                "server_mode": fork_server.server().mode if factory.pool.start_method == "forkserver" else None,
                "worker_start": [r.get("start") for r in reports]}


def measure(executor: str = "mp", start_method: str | None = None, clients: int = 100, runs: int = 3,
            num_workers: int | None = None, timeout: float = 300.0) -> dict[str, Any]:
    """`runs` cold starts, each in a fresh subprocess; median/min/max of factory -> first result."""
    cmd = [sys.executable, "-m", "mp_executors.benchmarking.coldstart", "--executor", executor,
           "--clients", str(clients)]
    if start_method:
        cmd += ["--start-method", start_method]
    if num_workers:
        cmd += ["--workers", str(num_workers)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    runs_out = []
    for _ in range(runs):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cold start run failed ({' '.join(cmd)}): {proc.stderr[-2000:]}")
        runs_out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    samples = [r["factory_to_first_result_s"] for r in runs_out]
    return {
        "median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples,
        "rounds": runs,
        "after_tf_import_median": statistics.median(r["after_tf_import_s"] for r in runs_out),
        "tf_import_median": statistics.median(r["tf_import_s"] for r in runs_out),
        "process_to_first_result_median": statistics.median(r["process_to_first_result_s"] for r in runs_out),
        "runs": runs_out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executor", choices=("mp", "local"), default="mp")
    parser.add_argument("--start-method", default=None, help="mp: forkserver (default), loky or spawn")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="mp: num_workers (default: auto)")
    parser.add_argument("--pool-ready", action="store_true",
                        help="mp: only time the end of the TensorFlow import -> the pool's workers ready "
                             "(--workers, default 2)")
    args = parser.parse_args(argv)
    if args.pool_ready:
        out = _pool_ready(args.start_method, args.workers or 2)
    else:
        out = _run_once(args.executor, args.start_method, args.clients, args.workers)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
