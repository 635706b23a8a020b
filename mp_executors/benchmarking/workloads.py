"""The FACTS.md benchmark workloads, shared by `mp-executors bench` and `benchmarks/`.

The one definition of each workload: the suite, `benchmarks/pool_targets.py` and the
peer's script (`benchmarks/peers/tff_workloads.py`, written with TFF's API, whose client
data is generated exactly like `make_client`) measure the same thing.

"FedAvg": a 784->10 softmax regression; each client holds 100 examples x 784
features; a client update is 5 full-batch gradient steps with lr 0.1; the
server takes the (unweighted) mean of the client models.
"overhead": `federated_sum` of one float32 per client.
"small": the main job's model and data shape (FedProx synthetic, logreg): a 60->10 softmax
regression; each client holds 200 examples x 60 features; a client update is 10 SGD steps
of minibatch 10, in a per-client random order (a stateless draw keyed by the round's seed
and the client's id, as the main job draws its minibatches), lr 0.2; the server takes the
mean of the client models. Small matmuls and many steps: the per-op cost is the wall.

Both are written only with the public API, exactly as a user would.
"""

from __future__ import annotations

import numpy as np

import mp_executors as mpx
from mp_executors._tf import tf  # imported quietly
from mp_executors.executors import vectorized_random

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


def stacked_clients(n: int) -> tuple:
    """Clients 0..n-1 as two tensors (x, y) with a leading client axis: the floor's input.

    Filled in place (not stacked from a list of clients): one big allocation that goes
    back to the OS when freed, instead of n small ones that stay in malloc's heap.
    """
    xs = np.empty((n, EXAMPLES, FEATURES), np.float32)
    ys = np.empty((n, EXAMPLES), np.int32)
    for i in range(n):
        c = make_client(i)
        xs[i], ys[i] = c["x"], c["y"]
    return tf.constant(xs), tf.constant(ys)


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


# --------------------------------------------------------------------------- "small"

S_FEATURES, S_CLASSES, S_EXAMPLES, S_STEPS, S_BATCH, S_LR = 60, 10, 200, 10, 10, 0.2

SMALL_MODEL_TYPE = mpx.StructType([("w", mpx.TensorType(np.float32, (S_FEATURES, S_CLASSES))),
                                   ("b", mpx.TensorType(np.float32, (S_CLASSES,)))])
SMALL_DATA_TYPE = mpx.StructType([("id", mpx.TensorType(np.int32, ())),
                                  ("x", mpx.TensorType(np.float32, (S_EXAMPLES, S_FEATURES))),
                                  ("y", mpx.TensorType(np.int32, (S_EXAMPLES,)))])


def small_steps(w, b, round_seed, client_id, x, y):
    """One client's 10 minibatch SGD steps (plain TF; used by the computation and the floor)."""
    order = tf.argsort(tf.random.stateless_uniform([S_EXAMPLES], seed=tf.stack([round_seed, client_id])))

    def step(i, w, b):
        rows = order[i * S_BATCH:(i + 1) * S_BATCH]
        xb = tf.gather(x, rows)
        g = (tf.nn.softmax(tf.matmul(xb, w) + b) - tf.one_hot(tf.gather(y, rows), S_CLASSES)) / S_BATCH
        return i + 1, w - S_LR * tf.matmul(xb, g, transpose_a=True), b - S_LR * tf.reduce_sum(g, axis=0)

    _, w, b = tf.while_loop(lambda i, *_: i < S_STEPS, step, (tf.constant(0), w, b))
    return w, b


@mpx.tf_computation(SMALL_MODEL_TYPE, np.int32, SMALL_DATA_TYPE)
def small_update(model, round_seed, data):
    w, b = small_steps(model.w, model.b, round_seed, data.id, data.x, data.y)
    return {"w": w, "b": b}


@mpx.federated_computation(mpx.FederatedType(SMALL_MODEL_TYPE, mpx.SERVER),
                           mpx.FederatedType(np.int32, mpx.SERVER),
                           mpx.FederatedType(SMALL_DATA_TYPE, mpx.CLIENTS))
def small_round(model, round_seed, data):
    local = mpx.federated_map(small_update, (mpx.federated_broadcast(model), mpx.federated_broadcast(round_seed), data))
    return mpx.federated_mean(local)


def small_initial_model() -> dict:
    return {"w": np.zeros((S_FEATURES, S_CLASSES), np.float32), "b": np.zeros((S_CLASSES,), np.float32)}


def make_small_client(client_id: int) -> dict:
    """One client's data, deterministic in its id (usable as a ClientData builder)."""
    rng = np.random.default_rng([7, client_id])
    x = rng.standard_normal((S_EXAMPLES, S_FEATURES), dtype=np.float32)
    true_w = np.random.default_rng(7).standard_normal((S_FEATURES, S_CLASSES)).astype(np.float32)
    return {"id": np.int32(client_id), "x": x, "y": np.argmax(x @ true_w, axis=1).astype(np.int32)}


def stacked_small_clients(n: int) -> tuple:
    """Small-workload clients 0..n-1 as tensors (ids, x, y) with a leading client axis: its floor's input."""
    clients = [make_small_client(i) for i in range(n)]
    return (tf.constant(np.arange(n, dtype=np.int32)), tf.constant(np.stack([c["x"] for c in clients])),
            tf.constant(np.stack([c["y"] for c in clients])))


def small_floor_round_fn():
    """The floor: the same per-client math for ALL clients as one vectorized graph, one process.

    `tf.vectorized_map` (pfor) over every client at once, with the runtime's converters for
    the stateless random ops (without them pfor would loop over clients for those ops).
    """
    vectorized_random.register()

    @tf.function
    def run(w, b, round_seed, ids, xs, ys):
        ws, bs = tf.vectorized_map(lambda c: small_steps(w, b, round_seed, *c), (ids, xs, ys))
        return tf.reduce_mean(ws, 0), tf.reduce_mean(bs, 0)

    return run
