"""Federated averaging on synthetic data, written with the public API only.

    python -m mp_executors.examples.fedavg [--clients 100] [--rounds 5] [--executor mp|local] [--workers N]

Each client holds a few examples of a shared linear classification problem
(with a per-client shift); every round the server broadcasts a softmax
regression model, each client takes a few gradient steps on its own data,
and the server averages the client models weighted by example count.
Client data is described by an `mpx.ClientData`, so each worker builds its
own clients' data and keeps it resident across rounds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

import mp_executors as mpx

FEATURES, CLASSES, EXAMPLES = 20, 5, 64

MODEL = mpx.StructType([("w", mpx.TensorType(np.float32, (FEATURES, CLASSES))),
                        ("b", mpx.TensorType(np.float32, (CLASSES,)))])
DATA = mpx.StructType([("x", mpx.TensorType(np.float32, (EXAMPLES, FEATURES))),
                       ("y", mpx.TensorType(np.int32, (EXAMPLES,)))])


def make_client(client_id: int) -> dict:
    """Client `client_id`'s examples: deterministic in the id."""
    truth = np.random.default_rng(12345).normal(size=(FEATURES, CLASSES))
    rng = np.random.default_rng(client_id)
    x = (rng.normal(size=(EXAMPLES, FEATURES)) + rng.normal(scale=0.5, size=FEATURES)).astype(np.float32)
    y = np.argmax(x @ truth + rng.normal(scale=0.5, size=(EXAMPLES, CLASSES)), axis=1).astype(np.int32)
    return {"x": x, "y": y}


def build_round(local_steps: int = 5, lr: float = 0.5):
    from mp_executors._tf import tf  # noqa: PLC0415 - the computations' bodies are TensorFlow

    @mpx.tf_computation(MODEL, DATA)
    def client_update(model, data):
        w, b = model.w, model.b
        onehot = tf.one_hot(data.y, CLASSES)
        for _ in range(local_steps):
            probs = tf.nn.softmax(tf.matmul(data.x, w) + b)
            grad = (probs - onehot) / EXAMPLES
            w = w - lr * tf.matmul(data.x, grad, transpose_a=True)
            b = b - lr * tf.reduce_sum(grad, axis=0)
        return {"w": w, "b": b}

    @mpx.tf_computation(MODEL, DATA)
    def client_metrics(model, data):
        logits = tf.matmul(data.x, model.w) + model.b
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=data.y, logits=logits))
        correct = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), data.y), tf.float32))
        return {"loss": loss, "accuracy": correct}

    @mpx.tf_computation(DATA)
    def num_examples(data):
        return tf.cast(tf.shape(data.y)[0], tf.float32)

    @mpx.federated_computation(mpx.FederatedType(MODEL, mpx.SERVER), mpx.FederatedType(DATA, mpx.CLIENTS))
    def fedavg_round(model, data):
        broadcast = mpx.federated_broadcast(model)
        metrics = mpx.federated_mean(mpx.federated_map(client_metrics, (broadcast, data)))
        updated = mpx.federated_map(client_update, (broadcast, data))
        weights = mpx.federated_map(num_examples, data)
        return mpx.federated_mean(updated, weights), metrics

    return fedavg_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Federated averaging on synthetic data.")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--executor", choices=("mp", "local"), default="mp")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.executor == "mp":
        factory = mpx.mp_executor_factory(num_workers=args.workers)
    else:
        factory = mpx.local_executor_factory()
    fedavg_round = build_round()
    data = mpx.ClientData(make_client, list(range(args.clients)), DATA)
    model = {"w": np.zeros((FEATURES, CLASSES), np.float32), "b": np.zeros(CLASSES, np.float32)}
    with factory, mpx.execution_context(factory):
        for r in range(1, args.rounds + 1):
            start = time.perf_counter()
            model, metrics = fedavg_round(model, data)
            print(f"round {r:3d}  loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.3f}  "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
