"""The benchmark workloads on the peer: TensorFlow Federated 0.87's native C++ runtime.

    ~/.cache/mp_executors/tff-venv/bin/python benchmarks/peers/tff_workloads.py \
        --fedavg-clients 10,100,1000 --overhead-clients 10,100,1000,10000 --rounds 6 --out peer.json

Runs in the separate venv made by `setup_tff_venv.sh` (TFF is never a dependency of
mp_executors, and this file imports nothing from it). The workloads are those of
`mp_executors/benchmarking/workloads.py` (FACTS.md, "the peer"), written with TFF's API:

- "fedavg": 784->10 softmax, 100 examples x 784 features per client, 5 full-batch steps,
  lr 0.1, unweighted server mean; client data passed as values every round (as FACTS.md
  measured it). Client data is generated exactly like `workloads.make_client`.
- "overhead": `federated_sum` of one float32 per client.
- "tff_learning" (with --learning-clients): tff.learning weighted FedAvg, runtime "tff" (TFF's
  native runtime) and "mp" (the same TFF program on `mp_executors.tff`, --learning-workers
  workers), see `tff_dropin_bench.py`; this one needs mp_executors installed in the venv
  (setup_tff_venv.sh does it).

Writes JSON with the schema of `mp-executors bench`: {"rows": [{"workload", "runtime":
"tff", "clients", "rounds", "median", "min", "max", "samples", "memory"}], "versions": ...}.
Every number is the median of rounds 2..R (round 1 warms up). The C++ worker process that
TFF starts can outlive Python (FACTS.md): it is killed, by pid, before this script exits.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

FEATURES, CLASSES, EXAMPLES, STEPS, LR = 784, 10, 100, 5, 0.1


def make_client(client_id: int) -> collections.OrderedDict:
    rng = np.random.default_rng(client_id)
    return collections.OrderedDict(
        x=rng.random((EXAMPLES, FEATURES), dtype=np.float32),
        y=rng.integers(0, CLASSES, EXAMPLES).astype(np.int32),
    )


def summarize(samples: list[float]) -> dict:
    timed = samples[1:] if len(samples) > 1 else samples
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "samples": samples}


def children_rss() -> int:
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return 0
    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def kill_children() -> None:
    """Stops the C++ worker(s) this process started (by pid; they may otherwise linger)."""
    try:
        import psutil  # noqa: PLC0415
    except ImportError:
        return
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def build(tff, tf):
    model_t = tff.StructWithPythonType(
        [("w", tff.TensorType(np.float32, [FEATURES, CLASSES])), ("b", tff.TensorType(np.float32, [CLASSES]))],
        collections.OrderedDict,
    )
    data_t = tff.StructWithPythonType(
        [("x", tff.TensorType(np.float32, [EXAMPLES, FEATURES])), ("y", tff.TensorType(np.int32, [EXAMPLES]))],
        collections.OrderedDict,
    )

    @tff.tensorflow.computation(model_t, data_t)
    def client_update(model, data):
        w, b, x, y = model["w"], model["b"], data["x"], data["y"]
        onehot = tf.one_hot(y, CLASSES)
        n = tf.cast(tf.shape(x)[0], tf.float32)
        for _ in range(STEPS):
            p = tf.nn.softmax(tf.matmul(x, w) + b)
            g = (p - onehot) / n
            w = w - LR * tf.matmul(x, g, transpose_a=True)
            b = b - LR * tf.reduce_sum(g, axis=0)
        return collections.OrderedDict(w=w, b=b)

    @tff.federated_computation(tff.FederatedType(model_t, tff.SERVER), tff.FederatedType(data_t, tff.CLIENTS))
    def fedavg_round(model, data):
        return tff.federated_mean(tff.federated_map(client_update, (tff.federated_broadcast(model), data)))

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def overhead_sum(values):
        return tff.federated_sum(values)

    return fedavg_round, overhead_sum


def run_rounds(fn, rounds: int, memory: dict) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        memory["workers_rss"] = max(memory.get("workers_rss", 0), children_rss())
    return samples


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fedavg-clients", type=_ints, default=[10, 100, 1000])
    parser.add_argument("--overhead-clients", type=_ints, default=[10, 100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--learning-clients", type=_ints, default=[],
                        help="also tff.learning FedAvg on TFF and on mp_executors.tff (tff_dropin_bench.py)")
    parser.add_argument("--learning-workers", type=int, default=2)
    parser.add_argument("--learning-rounds", type=int, default=4)
    args = parser.parse_args(argv)

    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_federated as tff  # noqa: PLC0415

    tff.backends.native.set_sync_local_cpp_execution_context(default_num_clients=0)
    fedavg_round, overhead_sum = build(tff, tf)
    rows = []
    try:
        for n in args.fedavg_clients:
            print(f"peer: FedAvg, {n} clients, data passed each round ...", file=sys.stderr, flush=True)
            clients = [make_client(i) for i in range(n)]
            model = {"m": collections.OrderedDict(w=np.zeros((FEATURES, CLASSES), np.float32),
                                                  b=np.zeros(CLASSES, np.float32))}
            memory: dict = {}

            def one_round(clients=clients, model=model):
                model["m"] = fedavg_round(model["m"], clients)

            samples = run_rounds(one_round, args.rounds, memory)
            rows.append({"workload": "fedavg", "runtime": "tff", "clients": n, "rounds": args.rounds,
                         **summarize(samples), "memory": memory})
            del clients
        for n in args.overhead_clients:
            print(f"peer: federated_sum, {n} clients ...", file=sys.stderr, flush=True)
            values = list(np.random.default_rng(0).random(n, dtype=np.float32))
            memory = {}
            samples = run_rounds(lambda values=values: overhead_sum(values), args.rounds, memory)
            rows.append({"workload": "overhead", "runtime": "tff", "clients": n, "rounds": args.rounds,
                         **summarize(samples), "memory": memory})
    finally:
        kill_children()
    if args.learning_clients:
        # The drop-in workload: TFF's own tff.learning program, native and on our worker pool.
        from tff_dropin_bench import measure  # noqa: PLC0415 - a sibling script, needs mp_executors

        learning_rows, checks = measure(args.learning_clients, args.learning_rounds, args.learning_workers)
        rows += learning_rows
        bad = [c for c in checks if not c["allclose_rtol_1e-4"]]
        if bad:
            print(f"peer: tff.learning results differ between TFF and mp_executors.tff: {bad}", file=sys.stderr)
            return 1
    doc = {"rows": rows, "versions": {"tensorflow_federated": tff.__version__, "tensorflow": tf.__version__,
                                      "python": platform.python_version()}}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
