"""A plain numpy (float64) reference of FedAvg/FedProx/FedOpt for logistic regression.

Written from the algorithm's description (mp_executors.learning.fed_avg and .optimizers
docstrings), not from the implementation: the shuffling hash is re-derived in numpy uint32
arithmetic; only the round seed is drawn with the TF stateless ops the docstring names.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def mix32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.uint32)
    x = x ^ (x >> np.uint32(16))
    x = (x.astype(np.uint64) * 0x7FEB352D % 2**32).astype(np.uint32)
    x = x ^ (x >> np.uint32(15))
    x = (x.astype(np.uint64) * 0x846CA68B % 2**32).astype(np.uint32)
    return x ^ (x >> np.uint32(16))


def hashed_uniform(seed: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(seed, np.int64).astype(np.uint32)
    base = mix32(mix32((s[0].astype(np.uint64) + 0x9E3779B9) % 2**32) ^ s[1])
    counters = np.arange(int(np.prod(shape)), dtype=np.uint32).reshape(shape)
    bits = mix32(base ^ mix32(counters))
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / 2**24)


def round_seed(seed: int, round_number: int) -> int:
    keys = tf.random.experimental.stateless_split(tf.constant([seed, round_number], tf.int32), 2)
    return int(tf.random.stateless_uniform([], seed=keys[0], minval=0, maxval=2**31 - 1, dtype=tf.int32))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logreg_loss_grad(w, b, x, y, m):
    """(sum of masked CE losses, count, dW, db) of mean-over-real-rows CE for softmax(xW+b)."""
    p = softmax(x @ w + b)
    ce = -np.log(p[np.arange(len(y)), y])
    count = m.sum()
    onehot = np.eye(w.shape[1])[y]
    gl = m[:, None] * (p - onehot) / max(count, 1.0)
    return float((m * ce).sum()), float(count), x.T @ gl, gl.sum(0)


def client_train(w0, b0, client, *, lr, batch, steps=None, epochs=None, mu=0.0, rseed=0):
    """One client's local SGD; returns (w, b, loss_sum, seen, n)."""
    x, y, m = (client[k].astype(np.float64) if k != "y" else client[k] for k in ("x", "y", "mask"))
    size, n = len(m), float(m.sum())
    batches = max(math.ceil(n / batch), 1)
    passes = steps if steps is not None else epochs
    total = steps if steps is not None else epochs * batches
    keys = hashed_uniform((rseed, int(client.get("id", 0))), (passes, size))
    perms = np.argsort(keys + np.float32(2.0) * (np.float32(1.0) - client["mask"]), axis=1, kind="stable")
    w, b = w0.copy(), b0.copy()
    loss_sum = seen = 0.0
    if n == 0:
        return w, b, 0.0, 0.0, 0.0
    for i in range(total):
        p, j = i // batches, i % batches
        rows = j * batch + np.arange(batch)
        valid = (rows < size).astype(np.float64)
        idx = perms[p][np.minimum(rows, size - 1)]
        ls, cnt, gw, gb = logreg_loss_grad(w, b, x[idx], y[idx], m[idx] * valid)
        gw, gb = gw + mu * (w - w0), gb + mu * (b - b0)
        w, b = w - lr * gw, b - lr * gb
        loss_sum += ls
        seen += cnt
    return w, b, loss_sum, seen, n


class ServerOpt:
    """Reddi et al.'s Algorithm 2 on the pseudo-gradient g = x - mean(x_i) (numpy, float64)."""

    def __init__(self, kind, lr, momentum=0.0, beta_1=0.9, beta_2=0.99, tau=1e-3):
        self.kind, self.lr, self.mu, self.b1, self.b2, self.tau = kind, lr, momentum, beta_1, beta_2, tau
        self.state: dict = {}

    def step(self, name, x, g):
        st = self.state.setdefault(name, {"m": np.zeros_like(x), "v": np.full_like(x, self.tau**2)})
        if self.kind == "sgd":
            st["m"] = self.mu * st["m"] + g if self.mu > 0 else g
            return x - self.lr * st["m"]
        st["m"] = self.b1 * st["m"] + (1 - self.b1) * g if self.b1 > 0 else g
        g2 = g * g
        if self.kind == "adam":
            st["v"] = self.b2 * st["v"] + (1 - self.b2) * g2
        elif self.kind == "yogi":
            st["v"] = st["v"] - (1 - self.b2) * g2 * np.sign(st["v"] - g2)
        else:  # adagrad
            st["v"] = st["v"] + g2
        return x - self.lr * st["m"] / (np.sqrt(st["v"]) + self.tau)


def fed_avg_rounds(clients, w, b, server: ServerOpt, *, rounds, seed, weighting="num_examples", **local):
    """`rounds` rounds of FedAvg over all `clients`; returns (w, b, per-round training losses)."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    losses = []
    for r in range(rounds):
        rs = round_seed(seed, r)
        outs = [client_train(w, b, c, rseed=rs, **local) for c in clients]
        weights = np.array([o[4] if weighting == "num_examples" else 1.0 for o in outs])
        gw = sum(wt * (w - o[0]) for wt, o in zip(weights, outs)) / weights.sum()
        gb = sum(wt * (b - o[1]) for wt, o in zip(weights, outs)) / weights.sum()
        w, b = server.step("w", w, gw), server.step("b", b, gb)
        losses.append(sum(o[2] for o in outs) / max(sum(o[3] for o in outs), 1.0))
    return w, b, losses
