"""FedAvg / FedProx / FedOpt / DP-FedAvg as an iterative process of our computations.

`fed_avg(model, client_optimizer, server_optimizer=SGD(1.0), *, local_steps | local_epochs,
batch_size, mu=0.0, client_weighting=..., aggregator="mean" | dp(...), seed=0)` returns a
`FedAvgProcess`: `initialize()` -> state, `next(state, client_data)` -> (state, metrics).

One round, as the federated computation `next_computation(element_type)` traces it:

    state@SERVER ──prepare (weights, round seed, clip)──broadcast──► every client:
        local training from the server weights: a FIXED number of minibatch steps of the
        client optimizer (fixed shapes, masks, tf.where for the steps a small client skips),
        with FedProx's mu/2 |w - w_server|² when mu > 0; minibatches are drawn from one
        permutation per pass, keyed by (round seed, client id); real rows first, padding last
        update g_i = w_server - w_i (the pseudo-gradient), clipped to the DP clip if any
    one federated_sum (one request per worker) of every client's
        <w_i g_i, w_i, stats>  (w_i = examples | 1)              mean: g = Σ w_i g_i / Σ w_i
        <clip(g_i), [|g_i| <= C], stats>                          DP:   g = (Σ clip(g_i) + noise) / cohort
    state@SERVER ◄── server optimizer step on g; round + 1; (DP) next clip

`local_steps=K`: every client takes K steps (passes of ceil(n / batch_size) batches, reshuffled
each pass). `local_epochs=E`: E passes over its own n examples, i.e. E * ceil(n / B) steps,
run as E * ceil(N / B) fixed iterations of which the surplus leave the weights untouched. So
every client runs the same graph with the same trip counts: a shard's clients are one
TensorFlow call and vectorize (`tf.vectorized_map`) without a fallback.

Everything random comes from stateless RNGs keyed by (seed, round[, client id]), and all
reductions are the runtime's fixed-order ones: a run is bitwise the same on any runtime and any
number of workers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import mp_executors as mpx
from mp_executors._tf import tf
from mp_executors.learning import layout as layout_lib
from mp_executors.learning import optimizers as opt_lib
from mp_executors.learning import privacy as dp_lib
from mp_executors.learning.models import Model
from mp_executors.learning.models import no_autograph as _no_autograph

__all__ = ["FedAvgConfig", "FedAvgProcess", "fed_avg"]

WEIGHTINGS = ("num_examples", "uniform")


@dataclass(frozen=True)
class FedAvgConfig:
    """The hyper-parameters of a FedAvg process (everything that decides its numbers but the model)."""

    client_optimizer: opt_lib.Optimizer
    server_optimizer: opt_lib.Optimizer
    batch_size: int
    local_steps: int | None = None
    local_epochs: int | None = None
    mu: float = 0.0
    client_weighting: str = "num_examples"
    aggregator: Any = "mean"
    seed: int = 0
    split: str | None = None


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"fed_avg: {name}={value!r} is invalid: it must be a positive integer.")
    return int(value)


def fed_avg(
    model: Model,
    client_optimizer: Any,
    server_optimizer: Any = None,
    *,
    batch_size: int,
    local_steps: int | None = None,
    local_epochs: int | None = None,
    mu: float = 0.0,
    client_weighting: str | None = None,
    aggregator: Any = "mean",
    seed: int = 0,
    split: str | None = None,
) -> FedAvgProcess:
    """Builds FedAvg (FedProx when mu > 0, FedOpt with an adaptive server optimizer, DP-FedAvg
    with `aggregator=dp(...)`) for `model`.

    `client_optimizer`/`server_optimizer`: `mpx.learning` optimizers (SGD, Adam, Yogi,
    Adagrad) or a bare learning rate (SGD); the server's default is SGD(1.0), plain FedAvg.
    Give exactly one of `local_steps` (minibatch steps per client per round) and
    `local_epochs` (passes over the client's examples; default 1 when neither is given).
    `client_weighting`: "num_examples" (the default) or "uniform" (the default, and the only
    choice, with DP). `seed` keys the minibatch shuffling and the DP noise. `split`: the
    member of a client's data holding its training examples, e.g. "train".
    """
    if not isinstance(model, Model):
        raise TypeError(f"fed_avg: model must be an mpx.learning Model (from_keras_model, logreg, mlp), "
                        f"got {type(model).__name__}.")
    client_opt = opt_lib.as_optimizer(client_optimizer, "fed_avg: client_optimizer")
    server_opt = opt_lib.as_optimizer(1.0 if server_optimizer is None else server_optimizer,
                                      "fed_avg: server_optimizer")
    batch_size = _check_int("batch_size", batch_size)
    if local_steps is not None and local_epochs is not None:
        raise ValueError("fed_avg: give local_steps or local_epochs, not both.")
    if local_steps is None and local_epochs is None:
        local_epochs = 1
    local_steps = None if local_steps is None else _check_int("local_steps", local_steps)
    local_epochs = None if local_epochs is None else _check_int("local_epochs", local_epochs)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (mu >= 0 and math.isfinite(mu)):
        raise ValueError(f"fed_avg: mu={mu!r} is invalid: it must be a number >= 0 (0: FedAvg; > 0: FedProx).")
    if not (isinstance(aggregator, dp_lib.DPAggregator) or (isinstance(aggregator, str) and aggregator == "mean")):
        raise ValueError(f"fed_avg: aggregator must be 'mean' or mpx.learning.dp(...), got {aggregator!r}.")
    private = isinstance(aggregator, dp_lib.DPAggregator)
    if client_weighting is None:
        client_weighting = "uniform" if private else "num_examples"
    if client_weighting not in WEIGHTINGS:
        raise ValueError(f"fed_avg: client_weighting={client_weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")
    if private and client_weighting != "uniform":
        raise ValueError("fed_avg: a DP aggregator weighs every client equally (its sensitivity is one clipped "
                         "update); use client_weighting='uniform' (the default with dp).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise ValueError(f"fed_avg: seed={seed!r} is invalid: it must be an integer in [0, 2**31).")
    cfg = FedAvgConfig(client_opt, server_opt, batch_size, local_steps, local_epochs, float(mu),
                       client_weighting, aggregator, int(seed), split)
    return FedAvgProcess(model, cfg)


@dataclass
class FedAvgProcess:
    """An iterative process: `initialize()` -> state; `next(state, client_data)` -> (state, metrics).

    The state is a dict of numpy values at the server:
    `{"model": {weight: array}, "optimizer": {"step", slot: {weight: array}}, "round": int32}`,
    plus `"aggregator": {"clip": float32}` with DP; it is everything a checkpoint needs.
    """

    model: Model
    config: FedAvgConfig
    _computations: dict[Any, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def private(self) -> bool:
        return isinstance(self.config.aggregator, dp_lib.DPAggregator)

    # ------------------------------------------------------------------ state

    def initialize(self) -> dict[str, Any]:
        """The state before round 1: the model's initial weights, a fresh server optimizer."""
        weights = self.model.initial_weights()
        train = self.model.trainable_names
        opt = self.config.server_optimizer.initial_state([weights[n] for n in train])
        state: dict[str, Any] = {
            "model": weights,
            "optimizer": {k: (v if k == "step" else dict(zip(train, v))) for k, v in opt.items()},
            "round": np.int32(0),
        }
        if self.private:
            state["aggregator"] = self.config.aggregator.initial_state()
        return state

    @staticmethod
    def get_model_weights(state: dict[str, Any]) -> dict[str, np.ndarray]:
        return state["model"]

    def _check_state(self, state: Any) -> None:
        expected = set(self.initialize())
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"next: state must be what initialize() or next() returned (keys {sorted(expected)}), "
                             f"got {got}.")
        self.model.check_weights(state["model"], "next: state['model']")

    # ------------------------------------------------------------------ running

    def next(self, state: dict[str, Any], client_data: Any) -> tuple[dict[str, Any], dict[str, float]]:
        """One round on `client_data` (an mpx.ClientData or a list of per-client values)."""
        self._check_state(state)
        element_type = layout_lib.element_type_of(client_data, "next")
        comp = self.next_computation(element_type)
        result = comp(state, client_data)
        return _to_numpy(result["state"]), {k: float(v) for k, v in result["metrics"].items()}

    def next_computation(self, element_type: Any) -> mpx.Computation:
        """The round as one federated computation (SERVER state, CLIENTS data) -> SERVER <state, metrics>.

        Traced once per client element type and cached.
        """
        key = str(element_type)
        with self._lock:
            comp = self._computations.get(key)
            if comp is None:
                layout = layout_lib.layout_for(self.model, element_type, self.config.split, "next")
                comp = self._computations[key] = _build_next(self, layout)
        return comp

    def state_type(self) -> mpx.Type:
        return mpx.infer_type(self.initialize())


def _to_numpy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    if hasattr(value, "to_dict") and not isinstance(value, np.ndarray):
        return _to_numpy(value.to_dict())
    return np.asarray(value) if not isinstance(value, np.ndarray) else value


# --------------------------------------------------------------------------- the math


def local_training(model: Model, cfg: FedAvgConfig, layout: layout_lib.Layout, weights: list, x, y, mask, seed):
    """One client's local training (TensorFlow, fixed shapes): returns
    (trained trainable weights, loss sum, examples seen, examples n).

    `seed`: an int32[2] stateless-RNG key (round seed, client id). Public so that tests can
    run it under `tf.vectorized_map`.
    """
    size, batch = layout.size, cfg.batch_size
    train_idx = [i for i, tr in enumerate(model.trainable) if tr]
    start = [weights[i] for i in train_idx]
    n = tf.reduce_sum(mask)
    batches = tf.maximum(tf.cast(tf.math.ceil(n / batch), tf.int32), 1)
    max_batches = -(-size // batch)
    if cfg.local_steps is not None:
        num_steps, passes = cfg.local_steps, cfg.local_steps  # at most one pass per step
    else:
        num_steps, passes = cfg.local_epochs * max_batches, cfg.local_epochs
    # One permutation per pass: real rows in random order first, padding last.
    keys = hashed_uniform(seed, [passes, size])
    perms = tf.argsort(keys + 2.0 * (1.0 - mask), axis=1, stable=True)
    offsets = tf.range(batch)

    def full(trainable):
        out = list(weights)
        for i, w in zip(train_idx, trainable):
            out[i] = w
        return out

    def step(i, trainable, opt_state, loss_sum, seen):
        if cfg.local_steps is not None:
            # Every step is real (an empty client's steps have zero gradients and change nothing).
            p, j, active = i // batches, i % batches, None
        else:
            p, j = i // max_batches, i % max_batches
            active = j < batches
        rows = j * batch + offsets
        valid = tf.cast(rows < size, tf.float32)
        idx = tf.gather(tf.gather(perms, p), tf.minimum(rows, size - 1))
        xb, yb, mb = tf.gather(x, idx), tf.gather(y, idx), tf.gather(mask, idx) * valid
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            total, count, _ = model.masked_sums(full(trainable), xb, yb, mb, with_metrics=False)
            loss = total / tf.maximum(count, 1.0)
            if cfg.mu > 0:
                loss += 0.5 * cfg.mu * tf.add_n([tf.reduce_sum(tf.square(w - w0)) for w, w0 in zip(trainable, start)])
        grads = tape.gradient(loss, trainable)
        grads = [tf.zeros_like(w) if g is None else g for w, g in zip(trainable, grads)]
        new_state, new_w = cfg.client_optimizer.apply(opt_state, trainable, grads)
        if active is None:
            return i + 1, new_w, new_state, loss_sum + total, seen + count

        # local_epochs: the iterations past this client's own ceil(n / B) batches of a pass
        # leave everything as it was (a select, not a branch: it vectorizes).
        def keep(new, old):
            return tf.where(active, new, old)

        on = tf.cast(active, tf.float32)
        return (i + 1, [keep(a, b) for a, b in zip(new_w, trainable)],
                tf.nest.map_structure(keep, new_state, opt_state), loss_sum + on * total, seen + on * count)

    opt_state = _initial_state_tf(cfg.client_optimizer, start)
    zero = tf.constant(0.0)
    _, trained, _, loss_sum, seen = tf.while_loop(
        lambda i, *_: i < num_steps, step, (tf.constant(0), start, opt_state, zero, zero))
    return trained, loss_sum, seen, n


def _mix32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with good avalanche."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def hashed_uniform(seed, shape: list[int]):
    """Uniform [0, 1) float32s of a static `shape`, a pure function of `seed` (int32[2]).

    Counter-based: element k is hash(hash(seed) ^ hash(k)). Unlike `tf.random.stateless_*`,
    whose key-derivation op has no vectorized form, these are plain integer ops: a client
    function that draws its shuffles this way, keyed by its id, vectorizes over clients.
    """
    s = tf.cast(seed, tf.uint32)
    base = _mix32(tf.bitwise.bitwise_xor(_mix32(s[0] + tf.constant(0x9E3779B9, tf.uint32)), s[1]))
    counters = tf.reshape(tf.range(int(np.prod(shape)), dtype=tf.int32), shape)
    bits = _mix32(tf.bitwise.bitwise_xor(base, _mix32(tf.cast(counters, tf.uint32))))
    # The top 24 bits: exactly representable in float32.
    return tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) * (1.0 / 2**24)


def _initial_state_tf(opt: opt_lib.Optimizer, weights: list) -> dict[str, Any]:
    state: dict[str, Any] = {"step": tf.constant(0, tf.int32)}
    for slot in opt.slots:
        state[slot] = [tf.fill(tf.shape(w), tf.constant(opt._slot_init(slot), w.dtype)) for w in weights]
    return state


def _round_keys(seed: int, round_number) -> tuple[Any, Any]:
    """(the clients' round seed, an int32 scalar; the server's noise key), from (seed, round)."""
    keys = tf.random.experimental.stateless_split(tf.stack([tf.constant(seed, tf.int32), round_number]), 2)
    round_seed = tf.random.stateless_uniform([], seed=keys[0], minval=0, maxval=2**31 - 1, dtype=tf.int32)
    return round_seed, keys[1]


def _build_next(process: FedAvgProcess, layout: layout_lib.Layout) -> mpx.Computation:
    model, cfg = process.model, process.config
    agg = cfg.aggregator if process.private else None
    names, train = list(model.names), list(model.trainable_names)
    state_t = process.state_type()
    weights_t = model.weights_type
    slots = list(cfg.server_optimizer.slots)

    broadcast_t = {"weights": weights_t, "round_seed": mpx.TensorType(np.int32)}
    if agg is not None:
        broadcast_t["clip"] = mpx.TensorType(np.float32)
    broadcast_t = mpx.StructType(list(broadcast_t.items()), dict)

    @mpx.tf_computation(state_t)
    @_no_autograph
    def prepare(state):
        round_seed, _ = _round_keys(cfg.seed, state["round"])
        out = {"weights": state["model"], "round_seed": round_seed}
        if agg is not None:
            out["clip"] = state["aggregator"]["clip"]
        return out

    @mpx.tf_computation(broadcast_t, layout.element_type)
    @_no_autograph
    def client_update(server, element):
        x, y, mask = layout.examples(element)
        weights = [server["weights"][n] for n in names]
        seed = tf.stack([server["round_seed"], layout.client_id(element)])
        trained, loss_sum, seen, n = local_training(model, cfg, layout, weights, x, y, mask, seed)
        update = [w0 - w for w0, w in zip([server["weights"][n] for n in train], trained)]
        stats = tf.stack([loss_sum, seen, n, tf.constant(1.0)])
        if agg is not None:
            update, unclipped = dp_lib.clip_update(update, server["clip"])
            return {"update": dict(zip(train, update)), "unclipped": unclipped, "stats": stats}
        # The weighted mean is sum(w_i g_i) / sum(w_i), both sums in the ONE federated_sum below.
        weight = n if cfg.client_weighting == "num_examples" else tf.constant(1.0)
        return {"update": {name: weight * u for name, u in zip(train, update)}, "weight": weight, "stats": stats}

    # The server gets the clients' outputs summed: the same structure.
    agg_t = client_update.type_signature.result

    @mpx.tf_computation(state_t, agg_t)
    @_no_autograph
    def server_update(state, aggregated):
        _, noise_key = _round_keys(cfg.seed, state["round"])
        stats = aggregated["stats"]
        loss_sum, seen = stats[0], stats[1]
        n_examples, n_clients = stats[2], stats[3]
        update = [aggregated["update"][n] for n in train]
        metrics: dict[str, Any] = {}
        new_state: dict[str, Any] = {}
        if agg is None:
            # All clients empty (total weight 0): no update rather than 0/0.
            total_weight = tf.maximum(aggregated["weight"], 1e-30)
            update = [u / total_weight for u in update]
        else:
            clip = state["aggregator"]["clip"]
            update_key, clip_key = tf.unstack(tf.random.experimental.stateless_split(noise_key, 2))
            update = dp_lib.noised_mean(agg, update, clip, update_key)
            metrics["clip"] = clip
            if agg.adaptive:
                new_clip, fraction = dp_lib.next_clip(agg, clip, aggregated["unclipped"], clip_key)
                metrics["unclipped_fraction"] = fraction
            else:
                new_clip = clip
        opt_in = {"step": state["optimizer"]["step"]}
        for s in slots:
            opt_in[s] = [state["optimizer"][s][n] for n in train]
        opt_out, new_train = cfg.server_optimizer.apply(opt_in, [state["model"][n] for n in train], update)
        new_weights = dict(state["model"])
        new_weights.update(zip(train, new_train))
        new_state["model"] = {n: new_weights[n] for n in names}
        new_state["optimizer"] = {"step": opt_out["step"], **{s: dict(zip(train, opt_out[s])) for s in slots}}
        new_state["round"] = state["round"] + 1
        if agg is not None:
            new_state["aggregator"] = {"clip": new_clip}
        denom = tf.maximum(seen, 1.0)
        metrics = {
            "loss": loss_sum / denom,
            "num_examples": n_examples,
            "num_clients": n_clients,
            **metrics,
        }
        return {"state": new_state, "metrics": metrics}

    @mpx.federated_computation(mpx.FederatedType(state_t, mpx.SERVER),
                               mpx.FederatedType(layout.element_type, mpx.CLIENTS))
    def next_round(state, clients):
        server = mpx.federated_broadcast(mpx.federated_map(prepare, state))
        out = mpx.federated_map(client_update, (server, clients))
        # ONE reduction for everything the server needs (weighted or clipped updates, weights or
        # unclipped flags, statistics): one request per worker, no selections of client values.
        return mpx.federated_map(server_update, (state, mpx.federated_sum(out)))

    return next_round
