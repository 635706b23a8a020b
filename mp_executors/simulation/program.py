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

Each round: the cohort (`sample_schedule`: drawn in the parent, round after round, from a
Generator seeded by the seed: a function of (seed, round), not of the total rounds) becomes a
ClientData over its ids (built in the workers), `process.next(state, cohort)`, and every
`eval_every` rounds (and after the last) the evaluation. Every other random number is keyed by
(seed, round[, client]) inside the process, so the state after round k (model, server-optimizer
state, round, DP clip) plus the metrics so far is all a resume needs (`Resume`, `on_checkpoint`),
a resumed run may go on to more rounds than it was started with (`evaluations_as_scheduled`),
and a run is bitwise the same on `local`, on `mp` with any number of workers, run after run,
interrupted and resumed or not. Ctrl-C raises `Interrupted` with the finished rounds.
"""
from __future__ import annotations

import hashlib
import importlib
import math
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


def sample_schedule(num_clients: int, cfg: FedAvgConfig) -> list[list[int] | None]:
    """Per round: the sorted sampled client ids, or None for all clients.

    Drawn round after round in the parent from one Generator seeded by `cfg.seed`, so it does
    not depend on the runtime, and round r's cohort does not depend on the total `cfg.rounds`
    (the schedule of R rounds is the first R of any longer one: a resumed run may extend its
    rounds). Sorted ids keep the runtime's reduction blocks in client-id order.
    """
    sampler = np.random.default_rng([cfg.seed, 1])
    k = cfg.clients_per_round
    if k is None or k >= num_clients:
        return [None] * cfg.rounds
    return [sorted(int(i) for i in sampler.choice(num_clients, k, replace=False)) for _ in range(cfg.rounds)]


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
        cohort = cfg.clients_per_round or data.num_clients
        _check_adaptive_noise(cfg, cohort)
        aggregator = learning.dp(cfg.noise_multiplier, cohort, clip=cfg.clip, adaptive=cfg.adaptive_clip)
    process = learning.fed_avg(
        net, learning.SGD(cfg.learning_rate), optimizers.get(cfg.server_optimizer, cfg.server_lr),
        batch_size=cfg.batch_size, local_steps=cfg.local_steps, local_epochs=cfg.local_epochs, mu=cfg.mu,
        aggregator=aggregator, seed=cfg.seed, split="train")
    return Training(net, process, learning.evaluate(net, split="train"), learning.evaluate(net, split="test"))


def _check_adaptive_noise(cfg: FedAvgConfig, cohort: int) -> None:
    """`learning.dp`'s adaptive-clipping bound, said in this job's settings (its own message names
    `dp`'s keyword arguments, such as clipped_count_stddev, which the job does not expose)."""
    from mp_executors.learning import privacy  # noqa: PLC0415 - imports TensorFlow (see learning_model)

    limit = privacy.adaptive_noise_limit(cohort)
    if not cfg.adaptive_clip or cfg.noise_multiplier <= 0 or cfg.noise_multiplier < limit:
        return
    fewest = math.floor(10 * cfg.noise_multiplier)
    more = (f"raise clients_per_round above {fewest}" if cfg.clients_per_round is not None
            else f"raise the number of clients above {fewest} (every client is in each round)")
    raise ValueError(
        f"noise_multiplier {cfg.noise_multiplier:g} is too much noise for adaptive_clip with {cohort} clients a "
        f"round (adaptive clipping adds its own noise, of std clients/20, which must exceed half the noise "
        f"multiplier); lower noise_multiplier below {limit:g}, {more}, or leave adaptive_clip out and give a "
        "fixed norm: clip C.")


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
        evaluations_as_scheduled(result, cfg)
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
            for r, sampled in enumerate(sample_schedule(data.num_clients, cfg), start=1):
                if r <= done:
                    continue
                clients = datasets.client_data(data, sampled)
                start = time.perf_counter()
                state, out = training.process.next(state, clients)
                train_s = time.perf_counter() - start
                metrics = {"local_loss": out["loss"]}
                metrics.update({k: out[k] for k in ("clip", "unclipped_fraction") if k in out})
                eval_s = None
                if evaluates(r, cfg):
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


#: The metrics an evaluation adds to a round's record.
EVAL_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def evaluates(round_number: int, cfg: FedAvgConfig) -> bool:
    """Whether round `round_number` ends with an evaluation: every `eval_every` rounds, and the last."""
    return round_number % cfg.eval_every == 0 or round_number == cfg.rounds


def evaluations_as_scheduled(result: RunResult, cfg: FedAvgConfig) -> None:
    """Drops the evaluations `cfg` would not have made (in place).

    A run extended on resume (`--rounds` raised) was evaluated after its old last round only
    because it was the last; the longer run does not evaluate there (unless `eval_every` says
    so), and the extended run's metrics are the longer run's. Evaluations never change the model.
    """
    for record in result.rounds:
        if record.eval_s is not None and not evaluates(record.round, cfg):
            for key in EVAL_KEYS:
                record.metrics.pop(key, None)
            record.eval_s = None


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
