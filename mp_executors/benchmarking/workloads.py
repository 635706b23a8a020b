"""The FACTS.md benchmark workloads, shared by `mp-executors bench` and `benchmarks/`.

The one definition of each workload: the suite, `benchmarks/pool_targets.py` and the
peer's script (`benchmarks/peers/tff_workloads.py`, written with TFF's API, whose client
data is generated exactly like `make_client`) measure the same thing.

"FedAvg": a 784->10 softmax regression; each client holds 100 examples x 784
features; a client update is 5 full-batch gradient steps with lr 0.1; the
server takes the (unweighted) mean of the client models.
"overhead": `federated_sum` of one float32 per client.

Both are written only with the public API, exactly as a user would.
"""

from __future__ import annotations

import numpy as np

import mp_executors as mpx
from mp_executors._tf import tf  # imported quietly

FEATURES, CLASSES, EXAMPLES, STEPS, LR = 784, 10, 100, 5, 0.1

MODEL_TYPE = mpx.StructType([("w", mpx.TensorType(np.float32, (FEATURES, CLASSES))),
                             ("b", mpx.TensorType(np.float32, (CLASSES,)))])
DATA_TYPE = mpx.StructType([("x", mpx.TensorType(np.float32, (EXAMPLES, FEATURES))),
                            ("y", mpx.TensorType(np.int32, (EXAMPLES,)))])


def softmax_steps(w, b, x, y):
    """5 full-batch gradient steps (plain TF; used by the computation and the floor)."""
    onehot = tf.one_hot(y, CLASSES)
    n = tf.cast(tf.shape(x)[0], tf.float32)
    for _ in range(STEPS):
        p = tf.nn.softmax(tf.matmul(x, w) + b)
        g = (p - onehot) / n
        w = w - LR * tf.matmul(x, g, transpose_a=True)
        b = b - LR * tf.reduce_sum(g, axis=0)
    return w, b


@mpx.tf_computation(MODEL_TYPE, DATA_TYPE)
def client_update(model, data):
    w, b = softmax_steps(model.w, model.b, data.x, data.y)
    return {"w": w, "b": b}


@mpx.federated_computation(mpx.FederatedType(MODEL_TYPE, mpx.SERVER),
                           mpx.FederatedType(DATA_TYPE, mpx.CLIENTS))
def fedavg_round(model, data):
    local = mpx.federated_map(client_update, (mpx.federated_broadcast(model), data))
    return mpx.federated_mean(local)


@mpx.federated_computation(mpx.FederatedType(np.float32, mpx.CLIENTS))
def overhead_sum(values):
    return mpx.federated_sum(values)


def initial_model() -> dict:
    return {"w": np.zeros((FEATURES, CLASSES), np.float32), "b": np.zeros((CLASSES,), np.float32)}


def make_client(client_id: int) -> dict:
    """One client's data, deterministic in its id (usable as a ClientData builder)."""
    rng = np.random.default_rng(client_id)
    return {"x": rng.random((EXAMPLES, FEATURES), dtype=np.float32),
            "y": rng.integers(0, CLASSES, EXAMPLES).astype(np.int32)}


def make_clients(n: int) -> list[dict]:
    return [make_client(i) for i in range(n)]


def floor_round_fn():
    """The one-process single-graph floor: one tf.function over all clients."""

    @tf.function
    def run(w, b, xs, ys):
        def one(args):
            x, y = args
            return softmax_steps(w, b, x, y)

        ws, bs = tf.map_fn(one, (xs, ys), fn_output_signature=(tf.float32, tf.float32))
        return tf.reduce_mean(ws, 0), tf.reduce_mean(bs, 0)

    return run
