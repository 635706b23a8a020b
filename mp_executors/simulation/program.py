"""The main job's program: FedAvg and friends on `mpx.learning`, the round loop, checkpoints' contents.

`run_fedavg` is what `mp-executors run` runs. It builds, from a `ModelSpec`, a `DatasetSpec`
and a `FedAvgConfig` (`build_training`):

- the model: `learning.logreg` / `learning.mlp`, or a user's Keras model ("MODULE:FUNCTION",
  `learning.from_keras_model`, built in a fresh Keras session seeded with the run's seed);
- the process: `learning.fed_avg` with client SGD at `learning_rate`, the server optimizer
  (`server_optimizer`, `server_lr`), `local_steps | local_epochs`, FedProx's `mu`, and DP-FedAvg
  (`learning.dp`) when `clip`, `noise_multiplier` or `adaptive_clip` is set;
- the evaluations: `learning.evaluate` on the train and on the test split of a fixed seeded
  sample of `eval_clients` clients (`eval_ids`; None: everyone).

Each round: the cohort (`sample_schedule`: drawn in the parent from Generators seeded by the
seed, a pure function of (seed, round)) becomes a ClientData over its ids (built in the
workers), `process.next(state, cohort)`, and every `eval_every` rounds the evaluation. Every
other random number is keyed by (seed, round[, client]) inside the process, so the state after
round k (model, server-optimizer state, round, DP clip) plus the metrics so far is all a resume
needs (`Resume`, `on_checkpoint`), and a run is bitwise the same on `local`, on `mp` with any
number of workers, run after run, interrupted and resumed or not. Ctrl-C raises `Interrupted`
with the finished rounds.

`build_computations` is the hand-written FedAvg round this job ran before `mpx.learning`
(plain TensorFlow, `models.masked_sums`); the benchmark suite and the vectorization tests still
measure it as "the main job's workload".
"""
from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import mp_executors as mpx
from mp_executors.simulation import datasets, models

#: Defaults of `mp-executors run` (see FedAvgConfig and the README's main-job section).
DEFAULT_LOCAL_STEPS = 10
DEFAULT_LR = 0.2
#: Clients evaluated by default: a fixed sample of this many (or every client, if fewer).
DEFAULT_EVAL_CLIENTS = 1000
SERVER_OPTIMIZERS = ("sgd", "sgdm", "adam", "yogi", "adagrad")  # == mpx.learning.optimizers.NAMES


@dataclass(frozen=True)
class FedAvgConfig:
    """The training hyper-parameters of a run (no runtime settings: those don't change results)."""

    rounds: int = 10
    clients_per_round: int | None = None  # None: every client, every round
    # Local work per round: either `local_steps` minibatch SGD steps on every client (the
    # same number whatever the client's size), or `local_epochs` passes over its examples.
    # Exactly one is set; local_steps wins the default when neither is given.
    local_steps: int | None = None
    local_epochs: int | None = None
    batch_size: int = 10
    learning_rate: float = DEFAULT_LR
    mu: float = 0.0  # FedProx proximal weight; 0 is plain FedAvg
    seed: int = 0
    eval_every: int = 1
    # The server optimizer (mpx.learning.optimizers.get: sgd, sgdm, adam, yogi, adagrad) and its
    # learning rate (None: 1.0 for sgd/sgdm, i.e. plain FedAvg/FedAvgM; 0.1 for the adaptive ones).
    server_optimizer: str = "sgd"
    server_lr: float | None = None
    # DP-FedAvg: clip each client's update to L2 norm `clip` (the initial clip if adaptive) and
    # add Gaussian noise of std noise_multiplier * clip to the sum. All None/0/False: no DP.
    clip: float | None = None
    noise_multiplier: float = 0.0
    adaptive_clip: bool = False
    delta: float = 1e-5  # the delta epsilon is reported at
    # Clients evaluated (a fixed seeded sample, the same every time); None: every client.
    eval_clients: int | None = None

    def __post_init__(self) -> None:
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("give local_steps or local_epochs, not both.")
        if self.local_steps is None and self.local_epochs is None:
            object.__setattr__(self, "local_steps", DEFAULT_LOCAL_STEPS)
        for name in ("rounds", "local_steps", "local_epochs", "batch_size", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.clients_per_round is not None and self.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be at least 1, got {self.clients_per_round}.")
        if not self.learning_rate > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.learning_rate}.")
        if self.mu < 0:
            raise ValueError(f"mu must be >= 0, got {self.mu}.")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server_optimizer {self.server_optimizer!r}; choose one of "
                             f"{', '.join(SERVER_OPTIMIZERS)}.")
        if self.server_lr is not None and not self.server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.server_lr}.")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}.")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.")
        if self.noise_multiplier > 0 and self.clip is None and not self.adaptive_clip:
            raise ValueError("noise_multiplier needs a clip (the noise is noise_multiplier x clip): give clip or "
                             "adaptive_clip.")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}.")
        if self.eval_clients is not None and self.eval_clients < 1:
            raise ValueError(f"eval_clients must be at least 1, got {self.eval_clients}.")

    @property
    def private(self) -> bool:
        """DP-FedAvg (clipping, noise) rather than the plain weighted mean."""
        return self.clip is not None or self.noise_multiplier > 0 or self.adaptive_clip


@dataclass
class Computations:
    train_round: Any
    evaluate: Any


def build_computations(model: models.ModelSpec, data: datasets.DatasetSpec, cfg: FedAvgConfig) -> Computations:
    """Traces the program's computations for this model, dataset shape and config."""
    from mp_executors._tf import tf  # noqa: PLC0415 - the computations' bodies are TensorFlow

    params_t = models.param_type(model)
    element_t = datasets.element_type(data)
    train_t = datasets.split_type(data.split_sizes[0], data.num_features)
    names = model.names
    size = data.split_sizes[0]
    batch, epochs, steps, lr, mu = cfg.batch_size, cfg.local_epochs, cfg.local_steps, cfg.learning_rate, cfg.mu

    @mpx.tf_computation(params_t, np.int32, np.int32, train_t)
    def client_update(params, round_seed, client_id, train):
        start = [getattr(params, n) for n in names]
        n = tf.reduce_sum(train.mask)
        batches = tf.maximum(tf.cast(tf.math.ceil(n / batch), tf.int32), 1)
        # SGD steps this round: a fixed number, or `epochs` passes of `batches` steps.
        num_steps = tf.constant(steps) if steps is not None else epochs * batches
        # One permutation per pass over the data: real rows in random order first, padding
        # last, so a pass visits ceil(n / batch) batches and padded rows are (almost) never
        # touched. With local_steps, ceil(steps / batches) passes (the last may be partial).
        # Shapes do not depend on the client's data, so a shard vectorizes this over its clients
        # (executors/vectorized_map.py): keys for the most passes any client can need (`steps`
        # with local_steps, as batches >= 1); a client uses its first ceil(steps / batches) rows,
        # the same numbers a [passes, size] draw gives (the stateless stream is a prefix).
        keys = tf.random.stateless_uniform([epochs if steps is None else steps, size],
                                           seed=tf.stack([round_seed, client_id]))
        perms = tf.argsort(keys + 2.0 * (1.0 - train.mask), axis=1, stable=True)

        def step(i, weights, loss_sum, seen):
            # `batch` rows of pass i // batches (gathers, not a slice with per-client bounds); a
            # position past the end repeats the last row with mask 0, as if the batch were short.
            pos = (i % batches) * batch + tf.range(batch)
            rows = tf.gather(tf.gather(perms, i // batches), tf.minimum(pos, size - 1))
            x, y = tf.gather(train.x, rows), tf.gather(train.y, rows)
            m = tf.gather(train.mask, rows) * tf.cast(pos < size, tf.float32)
            with tf.GradientTape() as tape:
                tape.watch(weights)
                total, _, count = models.masked_sums(model, weights, x, y, m)
                loss = total / tf.maximum(count, 1.0)
                if mu > 0:
                    loss += 0.5 * mu * tf.add_n([tf.reduce_sum(tf.square(w - w0)) for w, w0 in zip(weights, start)])
            grads = tape.gradient(loss, weights)
            weights = [w - lr * g for w, g in zip(weights, grads)]
            return i + 1, weights, loss_sum + total, seen + count

        _, weights, loss_sum, seen = tf.while_loop(
            lambda i, *_: i < num_steps, step,
            (tf.constant(0), start, tf.constant(0.0), tf.constant(0.0)),
        )
        return {"params": dict(zip(names, weights)), "weight": n, "loss_sum": loss_sum, "seen": seen}

    @mpx.federated_computation(
        mpx.FederatedType(params_t, mpx.SERVER),
        mpx.FederatedType(np.int32, mpx.SERVER),
        mpx.FederatedType(element_t, mpx.CLIENTS),
    )
    def train_round(params, round_seed, clients):
        # Selections are column bookkeeping in the shards: no client data moves.
        out = mpx.federated_map(client_update, (
            mpx.federated_broadcast(params), mpx.federated_broadcast(round_seed), clients.id, clients.train))
        new_params = mpx.federated_mean(out.params, out.weight)
        return new_params, mpx.federated_sum(out.loss_sum), mpx.federated_sum(out.seen)

    @mpx.tf_computation(params_t, element_t)
    def client_eval(params, client):
        weights = [getattr(params, n) for n in names]
        tr = models.masked_sums(model, weights, client.train.x, client.train.y, client.train.mask)
        te = models.masked_sums(model, weights, client.test.x, client.test.y, client.test.mask)
        return tf.stack(list(tr) + list(te))

    @mpx.federated_computation(mpx.FederatedType(params_t, mpx.SERVER), mpx.FederatedType(element_t, mpx.CLIENTS))
    def evaluate(params, clients):
        return mpx.federated_sum(mpx.federated_map(client_eval, (mpx.federated_broadcast(params), clients)))

    return Computations(train_round, evaluate)


@dataclass
class RoundRecord:
    round: int
    clients: int
    metrics: dict[str, float]
    train_s: float
    eval_s: float | None


@dataclass
class RunResult:
    params: dict[str, np.ndarray]
    rounds: list[RoundRecord] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    startup_s: float = 0.0

    @property
    def final_metrics(self) -> dict[str, float]:
        for r in reversed(self.rounds):
            if "test_accuracy" in r.metrics:
                return r.metrics
        return self.initial

    def model_digest(self) -> str:
        """sha256 of the final weights' bytes: equal digests mean bitwise-equal models."""
        h = hashlib.sha256()
        for name in sorted(self.params):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.params[name]).tobytes())
        return h.hexdigest()


def _eval_metrics(sums: np.ndarray) -> dict[str, float]:
    tr_loss, tr_correct, tr_n, te_loss, te_correct, te_n = (float(v) for v in np.asarray(sums))
    return {
        "train_loss": tr_loss / max(tr_n, 1.0), "train_accuracy": tr_correct / max(tr_n, 1.0),
        "test_loss": te_loss / max(te_n, 1.0), "test_accuracy": te_correct / max(te_n, 1.0),
    }


def sample_schedule(num_clients: int, cfg: FedAvgConfig) -> list[tuple[list[int] | None, int]]:
    """Per round: (sorted sampled client ids, or None for all clients; the round's seed).

    Drawn up front in the parent from Generators seeded by `cfg.seed`, so it does not depend
    on the runtime. Sorted ids keep the runtime's reduction blocks in client-id order.
    """
    sampler = np.random.default_rng([cfg.seed, 1])
    seeds = np.random.default_rng([cfg.seed, 2]).integers(0, 2**31 - 1, cfg.rounds)
    k = cfg.clients_per_round
    schedule = []
    for r in range(cfg.rounds):
        ids = None
        if k is not None and k < num_clients:
            ids = sorted(int(i) for i in sampler.choice(num_clients, k, replace=False))
        schedule.append((ids, int(seeds[r])))
    return schedule


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: carries the result of the rounds that finished (`result.rounds`)."""

    def __init__(self, result: RunResult):
        super().__init__()
        self.result = result


@dataclass
class Resume:
    """Where a resumed run starts: the state after `len(result.rounds)` rounds and its metrics so far."""

    state: dict[str, Any]
    result: RunResult


@dataclass
class Training:
    """The run's mpx.learning objects: the model, the FedAvg process, the two evaluations."""

    model: Any  # mpx.learning.Model
    process: Any  # mpx.learning.FedAvgProcess
    evaluate_train: Any
    evaluate_test: Any


def learning_model(spec: models.ModelSpec, seed: int) -> Any:
    """The `mpx.learning` Model for `spec`: logreg, mlp (the same weights as `models`), or a Keras model.

    A Keras model ("MODULE:FUNCTION") is built by calling FUNCTION() in a fresh Keras session
    seeded with `seed` (so its weights' names and initial values are reproducible); its outputs
    must be logits.
    """
    # mpx.learning imports TensorFlow: only once a run really starts (the CLI stays light).
    from mp_executors import learning  # noqa: PLC0415
    from mp_executors._tf import tf  # noqa: PLC0415

    if spec.name == "logreg":
        return learning.logreg(spec.num_features, spec.num_classes, seed)
    if spec.name == "mlp":
        return learning.mlp(spec.num_features, spec.num_classes, spec.hidden, seed)
    fn = keras_function(spec.name)
    # Keras numbers its layers per process (dense, dense_1, ...): a fresh session gives the weights
    # the same names in every run (they key model.npz and the checkpoint, and enter the model digest).
    tf.keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    return learning.from_keras_model(
        fn, loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        input_spec=(tf.TensorSpec([None, spec.num_features], tf.float32), tf.TensorSpec([None], tf.int32)),
        metrics=["accuracy"])


def keras_function(name: str) -> Callable[[], Any]:
    """FUNCTION of "MODULE:FUNCTION" (imported); ValueError saying what failed."""
    module_name, _, function_name = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name}: cannot import {function_name!r} from {module_name!r} ({e}).") from None
    if not callable(fn):
        raise ValueError(f"model {name}: {function_name!r} is not a function (it must return a Keras model).")
    return fn


def build_training(model: models.ModelSpec, data: datasets.DatasetSpec, cfg: FedAvgConfig) -> Training:
    """The run's FedAvg process and evaluations (mpx.learning) for this model, dataset and config."""
    from mp_executors import learning  # noqa: PLC0415 - imports TensorFlow (see learning_model)
    from mp_executors.learning import optimizers  # noqa: PLC0415

    net = learning_model(model, cfg.seed)
    aggregator: Any = "mean"
    if cfg.private:
        aggregator = learning.dp(cfg.noise_multiplier, cfg.clients_per_round or data.num_clients, clip=cfg.clip,
                                 adaptive=cfg.adaptive_clip)
    process = learning.fed_avg(
        net, learning.SGD(cfg.learning_rate), optimizers.get(cfg.server_optimizer, cfg.server_lr),
        batch_size=cfg.batch_size, local_steps=cfg.local_steps, local_epochs=cfg.local_epochs, mu=cfg.mu,
        aggregator=aggregator, seed=cfg.seed, split="train")
    return Training(net, process, learning.evaluate(net, split="train"), learning.evaluate(net, split="test"))


def eval_ids(num_clients: int, cfg: FedAvgConfig) -> list[int] | None:
    """The clients every evaluation uses: a fixed sample drawn from [seed, 3], sorted; None: everyone."""
    k = cfg.eval_clients
    if k is None or k >= num_clients:
        return None
    return sorted(int(i) for i in np.random.default_rng([cfg.seed, 3]).choice(num_clients, k, replace=False))


def accountant(data: datasets.DatasetSpec, cfg: FedAvgConfig, rounds: int = 0) -> Any:
    """The run's PrivacyAccountant (None without noise)."""
    if cfg.noise_multiplier <= 0:
        return None
    from mp_executors.learning import PrivacyAccountant  # noqa: PLC0415 - imports TensorFlow

    q = (cfg.clients_per_round or data.num_clients) / data.num_clients
    return PrivacyAccountant(cfg.noise_multiplier, min(q, 1.0), rounds)


def run_fedavg(
    model: models.ModelSpec,
    data: datasets.DatasetSpec,
    cfg: FedAvgConfig,
    factory: Any,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[], None] | None = None,
    *,
    resume: Resume | None = None,
    on_checkpoint: Callable[[RunResult, dict[str, Any]], None] | None = None,
    checkpoint_every: int = 1,
    training: Training | None = None,
) -> RunResult:
    """Runs `cfg.rounds` rounds of FedAvg (`mpx.learning.fed_avg`) on `factory` (from `resume` if given).

    `training`: what `build_training(model, data, cfg)` returns (built here if not given).

    Calls `on_start()` once the pool is up and the initial model evaluated, `on_round(record)`
    after each round, and `on_checkpoint(result, state)` after round 0 and every
    `checkpoint_every` rounds (and the last): the process `state` (numpy) and `result` are all
    a `Resume` needs. Ctrl-C raises `Interrupted` carrying the result of the finished rounds.
    """
    if training is None:
        training = build_training(model, data, cfg)
    ids = eval_ids(data.num_clients, cfg)
    # One ClientData over the evaluated clients, reused: the workers build them once and keep them.
    evaluated = datasets.client_data(data, ids)
    if resume is None:
        state = training.process.initialize()
        result = RunResult(params=state["model"])
    else:
        state, result = resume.state, resume.result
        result.params = state["model"]
    done = len(result.rounds)

    def evaluate(weights) -> dict[str, float]:
        train, test = training.evaluate_train(weights, evaluated), training.evaluate_test(weights, evaluated)
        return {"train_loss": train["loss"], "train_accuracy": train.get("accuracy", float("nan")),
                "test_loss": test["loss"], "test_accuracy": test.get("accuracy", float("nan"))}

    try:
        with mpx.execution_context(factory):
            if resume is None:
                start = time.perf_counter()
                # Round 0: the initial model's metrics; this first call also starts the pool.
                result.initial = evaluate(state["model"])
                result.startup_s = time.perf_counter() - start
                if on_checkpoint is not None:
                    on_checkpoint(result, state)
            if on_start is not None:
                on_start()
            # The schedule is a pure function of (seed, round), and so is every random number of a
            # round (keyed by the process's seed and state["round"]): resuming at round k draws the same.
            for r, (sampled, _) in enumerate(sample_schedule(data.num_clients, cfg), start=1):
                if r <= done:
                    continue
                clients = datasets.client_data(data, sampled)
                start = time.perf_counter()
                state, out = training.process.next(state, clients)
                train_s = time.perf_counter() - start
                metrics = {"local_loss": out["loss"]}
                metrics.update({k: out[k] for k in ("clip", "unclipped_fraction") if k in out})
                eval_s = None
                if r % cfg.eval_every == 0 or r == cfg.rounds:
                    start = time.perf_counter()
                    metrics.update(evaluate(state["model"]))
                    eval_s = time.perf_counter() - start
                record = RoundRecord(r, len(clients), metrics, train_s, eval_s)
                result.rounds.append(record)
                result.params = state["model"]
                if on_checkpoint is not None and (r % checkpoint_every == 0 or r == cfg.rounds):
                    on_checkpoint(result, state)
                if on_round is not None:
                    on_round(record)
    except KeyboardInterrupt:
        raise Interrupted(result) from None
    return result


def result_to_json(result: RunResult) -> dict:
    """The metrics part of a RunResult (no weights), for a checkpoint; floats round-trip exactly."""
    return {"initial": result.initial, "startup_s": result.startup_s,
            "rounds": [asdict(r) for r in result.rounds]}


def result_from_json(doc: dict, params: dict[str, np.ndarray]) -> RunResult:
    return RunResult(params=params, rounds=[RoundRecord(**r) for r in doc["rounds"]],
                     initial=dict(doc["initial"]), startup_s=float(doc["startup_s"]))


def config_dict(model: models.ModelSpec, data: datasets.DatasetSpec, cfg: FedAvgConfig) -> dict:
    """Everything that determines the numbers of a run."""
    return {"dataset": asdict(data), "model": asdict(model), "fedavg": asdict(cfg)}
