"""Optimizers for federated training: functional, for the server and for the clients.

An optimizer here is a small frozen description with two halves:

- `initial_state(weights)` (numpy, in the parent): the optimizer's state for a list of weights,
  a dict `{"step": int32, slot: [array per weight], ...}` that travels in the iterative
  process's state (so a checkpoint of that state is a checkpoint of the optimizer);
- `apply(state, weights, grads)` (TensorFlow, inside a `tf_computation`): one step, returning
  `(new_state, new_weights)`; no `tf.Variable`, nothing but ops on the tensors it is given, so
  it runs inside a client's `tf.while_loop` and under `tf.vectorized_map` alike.

On the server, FedAvg calls `apply` once per round with the *pseudo-gradient*
g = x_t - mean_i(x_i) (the clients' average update, negated), so `SGD(1.0)` makes the new
model exactly the clients' mean, as plain FedAvg does. Names and defaults follow Reddi et al.,
"Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, with Δ_t = -g:

    m_t = β1 m_{t-1} + (1 - β1) g_t                                 (Adam, Yogi; Adagrad if β1 > 0)
    v_t = v_{t-1} + g_t²                                            FedAdagrad
    v_t = v_{t-1} - (1 - β2) g_t² sign(v_{t-1} - g_t²)              FedYogi
    v_t = β2 v_{t-1} + (1 - β2) g_t²                                FedAdam
    x_{t+1} = x_t - η m_t / (√v_t + τ)                              v_{-1} = τ², no bias correction

with β1 = 0.9, β2 = 0.99 and τ = 1e-3 (the paper's fixed β's; τ is its "degree of
adaptivity", tuned there over 1e-10..1e-1). FedAdagrad defaults to β1 = 0 (no momentum), as
in the paper's experiments. `SGD(lr, momentum)` is FedAvgM (Hsu et al. 2019) on the server:
v_t = μ v_{t-1} + g_t, x_{t+1} = x_t - η v_t.

As client optimizers the same objects start from `initial_state` every round (clients keep no
state between rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mp_executors._tf import tf

__all__ = ["SGD", "Adagrad", "Adam", "Optimizer", "Yogi", "get"]


def _check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name}={value!r} is invalid: it must be a number > 0.")


def _check_unit(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name}={value!r} is invalid: it must be a number in [0, 1).")


class Optimizer:
    """Base class: a named, frozen, functional optimizer (see the module docstring)."""

    #: The per-weight state slots, in order (e.g. ("m", "v")).
    slots: tuple[str, ...] = ()

    def initial_state(self, weights: list[np.ndarray]) -> dict[str, Any]:
        """The state before the first step: step 0, every slot at its initial value."""
        state: dict[str, Any] = {"step": np.int32(0)}
        for slot in self.slots:
            state[slot] = [np.full(np.shape(w), self._slot_init(slot), np.float32) for w in weights]
        return state

    def _slot_init(self, slot: str) -> float:
        return 0.0

    def apply(self, state: Any, weights: list, grads: list) -> tuple[dict[str, Any], list]:
        """One step (TensorFlow): returns (new state, new weights)."""
        slots = {s: list(_get(state, s)) for s in self.slots}
        new_slots: dict[str, list] = {s: [] for s in self.slots}
        new_weights = []
        for i, (w, g) in enumerate(zip(weights, grads)):
            per = {s: slots[s][i] for s in self.slots}
            w, per = self._update(w, g, per)
            new_weights.append(w)
            for s in self.slots:
                new_slots[s].append(per[s])
        new_state: dict[str, Any] = {"step": _get(state, "step") + 1}
        new_state.update(new_slots)
        return new_state, new_weights

    def _update(self, w, g, slots: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError


def _get(state: Any, key: str) -> Any:
    return state[key] if isinstance(state, dict) else getattr(state, key)


@dataclass(frozen=True)
class SGD(Optimizer):
    """Stochastic gradient descent, with heavy-ball momentum when `momentum` > 0.

    On the server, `SGD(1.0)` is plain FedAvg and `SGD(1.0, momentum=0.9)` is FedAvgM.
    """

    learning_rate: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("SGD", "learning_rate", self.learning_rate)
        _check_unit("SGD", "momentum", self.momentum)

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("momentum",) if self.momentum > 0 else ()

    def _update(self, w, g, slots):
        if self.momentum > 0:
            v = self.momentum * slots["momentum"] + g
            return w - self.learning_rate * v, {"momentum": v}
        return w - self.learning_rate * g, slots


@dataclass(frozen=True)
class _Adaptive(Optimizer):
    """Shared by FedAdagrad, FedYogi and FedAdam: momentum m, preconditioner v, x -= η m/(√v+τ)."""

    learning_rate: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    #: v_{-1}; None means τ², the paper's lower bound for it.
    initial_accumulator: float | None = None

    slots = ("m", "v")

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(name, "learning_rate", self.learning_rate)
        _check_unit(name, "beta_1", self.beta_1)
        _check_unit(name, "beta_2", self.beta_2)
        _check_positive(name, "tau", self.tau)
        if self.initial_accumulator is not None and (
            isinstance(self.initial_accumulator, bool) or not self.initial_accumulator >= 0
        ):
            raise ValueError(f"{name}: initial_accumulator={self.initial_accumulator!r} is invalid: it must be >= 0.")

    def _slot_init(self, slot: str) -> float:
        if slot == "v":
            return self.tau**2 if self.initial_accumulator is None else float(self.initial_accumulator)
        return 0.0

    def _second_moment(self, v, g2):
        raise NotImplementedError

    def _update(self, w, g, slots):
        m = self.beta_1 * slots["m"] + (1.0 - self.beta_1) * g if self.beta_1 > 0 else g
        v = self._second_moment(slots["v"], tf.square(g))
        return w - self.learning_rate * m / (tf.sqrt(v) + self.tau), {"m": m, "v": v}


@dataclass(frozen=True)
class Adam(_Adaptive):
    """FedAdam: v_t = β2 v_{t-1} + (1 - β2) g²."""

    def _second_moment(self, v, g2):
        return self.beta_2 * v + (1.0 - self.beta_2) * g2


@dataclass(frozen=True)
class Yogi(_Adaptive):
    """FedYogi: v_t = v_{t-1} - (1 - β2) g² sign(v_{t-1} - g²)."""

    def _second_moment(self, v, g2):
        return v - (1.0 - self.beta_2) * g2 * tf.sign(v - g2)


@dataclass(frozen=True)
class Adagrad(_Adaptive):
    """FedAdagrad: v_t = v_{t-1} + g²; no momentum by default (β1 = 0)."""

    beta_1: float = 0.0

    def _second_moment(self, v, g2):
        return v + g2


#: The names `get` (and the main job's --server-optimizer) accept.
NAMES = ("sgd", "sgdm", "adam", "yogi", "adagrad")


def get(name: str, learning_rate: float | None = None) -> Optimizer:
    """An optimizer by name: sgd, sgdm (momentum 0.9), adam, yogi or adagrad, with the paper's defaults.

    `learning_rate` None means 1.0 for sgd/sgdm (plain FedAvg/FedAvgM) and the class default
    (0.1) for the adaptive ones.
    """
    key = str(name).lower()
    if key not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}.")
    kwargs = {} if learning_rate is None else {"learning_rate": learning_rate}
    if key in ("sgd", "sgdm"):
        kwargs.setdefault("learning_rate", 1.0)
        return SGD(momentum=0.9 if key == "sgdm" else 0.0, **kwargs)
    return {"adam": Adam, "yogi": Yogi, "adagrad": Adagrad}[key](**kwargs)


def as_optimizer(value: Any, what: str) -> Optimizer:
    """An Optimizer from an Optimizer or a bare learning rate (SGD); clear error otherwise."""
    if isinstance(value, Optimizer):
        return value
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        return SGD(float(value))
    raise TypeError(
        f"{what} must be an mpx.learning optimizer (SGD, Adam, Yogi, Adagrad) or a learning rate, "
        f"got {type(value).__name__} {value!r}."
    )
