"""tff.learning FedAvg on TFF's native runtime and on `mp_executors.tff`, side by side in one run.

    ~/.cache/mp_executors/tff-venv/bin/python benchmarks/peers/tff_dropin_bench.py \
        --clients 100,1000 --rounds 4 --workers 2 --out tff_dropin.json

Runs in the TFF venv (`setup_tff_venv.sh`). The workload (issue 10):
`tff.learning.algorithms.build_weighted_fed_avg` on a Keras 784->10 softmax model
(`from_keras_model`, SGD client optimizer lr 0.1, SGD-momentum server optimizer), each
client a `tf.data.Dataset` of 100 examples x 784 features, batch 100, repeated 5 times (5
local steps), the same dataset objects passed every round, as a TFF simulation loop does.
The program is TFF's; only the context differs:

    native  tff.backends.native.create_sync_local_cpp_execution_context()
    mp      mp_executors.tff.create_sync_execution_context(mpx.mp_executor_factory(num_workers=W))

Both start from the same initial state; after the last round their model weights must be
allclose (rtol 1e-4), which is checked and reported. Every time is the median of rounds
2..R (round 1 warms up: worker start, graph loading). Writes rows in the schema of
`mp-executors bench` (workload "tff_learning", runtimes "tff" and "mp"). TFF's C++ worker
is killed, by pid, when this script ends (it can outlive Python, FACTS.md).
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

FEATURES, CLASSES, EXAMPLES, BATCH, EPOCHS = 784, 10, 100, 100, 5
WORKLOAD = "tff_learning"


def make_client(client_id: int) -> collections.OrderedDict:
    rng = np.random.default_rng(client_id)
    return collections.OrderedDict(
        x=rng.random((EXAMPLES, FEATURES), dtype=np.float32),
        y=rng.integers(0, CLASSES, (EXAMPLES, 1)).astype(np.int32),
    )


def build_process(tf, tff):
    def model_fn():
        keras_model = tf.keras.Sequential([
            tf.keras.layers.InputLayer(input_shape=(FEATURES,)),
            tf.keras.layers.Dense(CLASSES),
            tf.keras.layers.Softmax(),
        ])
        return tff.learning.models.from_keras_model(
            keras_model,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            input_spec=collections.OrderedDict(x=tf.TensorSpec([None, FEATURES], tf.float32),
                                               y=tf.TensorSpec([None, 1], tf.int32)),
        )

    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0, momentum=0.9),
    )


def client_datasets(tf, n: int) -> list:
    return [tf.data.Dataset.from_tensor_slices(make_client(i)).batch(BATCH).repeat(EPOCHS) for i in range(n)]


def run_rounds(tff, context, process, state, data, rounds: int) -> tuple[list[float], object]:
    times = []
    with tff.framework.get_context_stack().install(context):
        for _ in range(rounds):
            start = time.perf_counter()
            state = process.next(state, data).state
            times.append(time.perf_counter() - start)
    return times, state


def summarize(samples: list[float]) -> dict:
    timed = samples[1:] if len(samples) > 1 else samples
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "samples": samples}


def kill_native_workers() -> None:
    import psutil  # noqa: PLC0415 - a dependency of the venv, imported where it is used

    for child in psutil.Process().children(recursive=True):
        try:
            if any("worker_binary" in part for part in [child.name(), *child.cmdline()]):
                child.kill()
        except psutil.Error:
            pass


def measure(clients: list[int], rounds: int, workers: int, with_native: bool = True) -> tuple[list, list]:
    """Rows (schema of `mp-executors bench`) and allclose checks, ours and TFF's, in this process."""
    import tensorflow as tf  # noqa: PLC0415 - after TF_CPP_MIN_LOG_LEVEL
    import tensorflow_federated as tff  # noqa: PLC0415

    import mp_executors as mpx  # noqa: PLC0415
    import mp_executors.tff as mtff  # noqa: PLC0415

    process = build_process(tf, tff)
    factory = mpx.mp_executor_factory(num_workers=workers)
    ours = mtff.create_sync_execution_context(factory)
    native = tff.backends.native.create_sync_local_cpp_execution_context() if with_native else None
    with tff.framework.get_context_stack().install(ours):
        initial = process.initialize()
    rows, checks = [], []
    try:
        for n in clients:
            data = client_datasets(tf, n)
            times, state_ours = run_rounds(tff, ours, process, initial, data, rounds)
            rows.append({"workload": WORKLOAD, "runtime": "mp", "clients": n, "rounds": rounds,
                         "workers": workers, **summarize(times)})
            print(f"{WORKLOAD} mp({workers})  {n:>5d} clients: median {rows[-1]['median']:.3f} s  {times}",
                  file=sys.stderr, flush=True)
            if native is None:
                continue
            times, state_native = run_rounds(tff, native, process, initial, data, rounds)
            rows.append({"workload": WORKLOAD, "runtime": "tff", "clients": n, "rounds": rounds, **summarize(times)})
            print(f"{WORKLOAD} tff     {n:>5d} clients: median {rows[-1]['median']:.3f} s  {times}",
                  file=sys.stderr, flush=True)
            a = process.get_model_weights(state_ours).trainable
            b = process.get_model_weights(state_native).trainable
            close = all(np.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b))
            diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))
            ratio = rows[-2]["median"] / rows[-1]["median"]
            checks.append({"clients": n, "allclose_rtol_1e-4": close, "max_abs_diff": diff, "ratio": ratio})
            print(f"  ours/tff = {ratio:.3f}; weights allclose(rtol 1e-4): {close} (max |diff| {diff:.2e})",
                  file=sys.stderr, flush=True)
    finally:
        factory.close()
        kill_native_workers()
    return rows, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="100,1000", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON file for the rows (printed anyway)")
    parser.add_argument("--no-native", action="store_true", help="ours only")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    rows, checks = measure(clients, args.rounds, args.workers, with_native=not args.no_native)

    import tensorflow as tf  # noqa: PLC0415 - already imported by measure()
    import tensorflow_federated as tff  # noqa: PLC0415

    doc = {"rows": rows, "checks": checks,
           "versions": {"tensorflow_federated": tff.__version__, "tensorflow": tf.__version__,
                        "python": platform.python_version()}}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    return 0 if all(c["allclose_rtol_1e-4"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
