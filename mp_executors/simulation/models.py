"""The main job's built-in models: their specs, weight names and shapes, initial values, logits.

A model is plain TensorFlow over a named list of weight tensors (no Keras); `mpx.learning`'s
`logreg` and `mlp` are these (`learning/models.py` adds the loss, the padding mask and the
metrics), and a spec may also name a user's Keras model ("MODULE:FUNCTION").

- ``logreg``: multinomial logistic regression, softmax(x W + b), the model of FedProx's
  synthetic experiments; starts from zeros.
- ``mlp``: one hidden ReLU layer (`hidden` units, default 64); Glorot-uniform weights drawn
  from a numpy Generator seeded in the parent, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODELS = ("logreg", "mlp")  # or "MODULE:FUNCTION", a function returning a Keras model (see `is_keras`)


def is_keras(name: str) -> bool:
    """A user's model: "MODULE:FUNCTION", FUNCTION() returning a Keras 3 model whose outputs are logits."""
    module, _, function = name.partition(":")
    return bool(module) and bool(function) and name not in MODELS


@dataclass(frozen=True)
class ModelSpec:
    name: str = "logreg"
    num_features: int = 60
    num_classes: int = 10
    hidden: int = 64  # mlp only

    def __post_init__(self) -> None:
        if self.name not in MODELS and not is_keras(self.name):
            raise ValueError(f"unknown model {self.name!r}; choose one of {', '.join(MODELS)} or MODULE:FUNCTION "
                             "(a function returning a Keras model).")
        if self.hidden < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden}.")

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        if is_keras(self.name):
            raise ValueError(f"a Keras model ({self.name}) has no built-in shapes; build it with mpx.learning.")
        f, k, h = self.num_features, self.num_classes, self.hidden
        if self.name == "logreg":
            return [("w", (f, k)), ("b", (k,))]
        return [("w1", (f, h)), ("b1", (h,)), ("w2", (h, k)), ("b2", (k,))]

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.shapes]

    def describe(self) -> str:
        if is_keras(self.name):
            return f"Keras model from {self.name} ({self.num_features} features, {self.num_classes} classes)"
        size = sum(int(np.prod(s)) for _, s in self.shapes)
        if self.name == "logreg":
            return f"logistic regression {self.num_features}->{self.num_classes} ({size} parameters)"
        return f"MLP {self.num_features}->{self.hidden}->{self.num_classes} ({size} parameters)"


def initial_params(spec: ModelSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial weights (zeros for logreg, Glorot-uniform for the MLP's matrices)."""
    params = {}
    for name, shape in spec.shapes:
        if spec.name == "mlp" and len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            params[name] = rng.uniform(-limit, limit, shape).astype(np.float32)
        else:
            params[name] = np.zeros(shape, np.float32)
    return params


def logits(spec: ModelSpec, params: list, x):
    """The model's logits for a batch `x` (params in `spec.names` order)."""
    from mp_executors._tf import tf  # noqa: PLC0415 - keep this module TF-free to import

    if spec.name == "logreg":
        w, b = params
        return tf.matmul(x, w) + b
    w1, b1, w2, b2 = params
    return tf.matmul(tf.nn.relu(tf.matmul(x, w1) + b1), w2) + b2
